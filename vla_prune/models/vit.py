"""A plain ViT with the parameter names of OpenVLA's HF checkpoints, so its weights load 1:1.

Those are timm's names, except LayerScale's `gamma`, which upstream stores as `scale_factor`.

We don't depend on timm (its torchvision dependency breaks CPU installs here); this file
re-implements the few pieces OpenVLA uses: patch embedding, class/register tokens, absolute
position embeddings, pre-norm blocks with optional LayerScale, and SigLIP's attention-pool head
(kept only so checkpoints map and parameter counts match; OpenVLA never runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch: int = 14
    image_size: int = 224
    class_token: bool = True
    reg_tokens: int = 0
    layer_scale: bool = False  # DINOv2: ls1/ls2.scale_factor (timm: gamma)
    attn_pool: bool = False  # SigLIP: MAP head (present in checkpoints, unused by OpenVLA)
    gelu_tanh: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    """timm's LayerScale, its parameter named as in OpenVLA's HF checkpoints: `scale_factor`.

    transformers rewrites parameter names containing "gamma", so upstream's converter and
    modeling_prismatic.py (`ls_apply_patch`) rename timm's `gamma` to `scale_factor`."""

    def __init__(self, width: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((width,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # State dicts saved before the rename (e.g. sim training states) hold timm's ".gamma".
        old, new = prefix + "gamma", prefix + "scale_factor"
        if old in state_dict and new not in state_dict:
            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, gelu_tanh: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if gelu_tanh else "none")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.gelu_tanh)
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's MAP head (SigLIP). Held for weight mapping; OpenVLA uses patch tokens instead."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.q = nn.Linear(cfg.width, cfg.width)
        self.kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.gelu_tanh)


class VisionTransformer(nn.Module):
    """Returns the patch tokens of the second-to-last block (what OpenVLA feeds its projector)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.width))
        # timm "no_embed_class": position embeddings cover the patches only.
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        if cfg.attn_pool:
            self.attn_pool = AttentionPoolLatent(cfg)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cfg.class_token) + self.cfg.reg_tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*prefix, x], dim=1)
        # timm's get_intermediate_layers(n={depth - 2}): stop after the second-to-last block,
        # no final norm, prefix tokens dropped. The last block is never run.
        for block in self.blocks[: self.cfg.depth - 1]:
            x = block(x)
        return x[:, self.num_prefix_tokens :]
