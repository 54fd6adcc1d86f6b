"""CogACT's action head: a DiT over [condition token, 16 noisy actions].

Structure and parameter names follow CogACT's `action_model/models.py` (itself derived from
facebookresearch/DiT), so a real checkpoint's `action_model.net.*` weights map 1:1:
x_embedder / history_embedder (Linear over the 7-DoF action), t_embedder.mlp.{0,2} (sinusoidal
timestep embedding -> MLP), z_embedder.linear + z_embedder.uncondition (the cognition feature and
the learned "unconditional" embedding used for classifier-free guidance), positional_embedding
[T + 1, d], blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2} (pre-norm, no adaLN), final_layer.

Each block exposes its two residual branches (`attn_branch`, `mlp_branch`) so that feature
caching (vla_prune.caching.dit_cache) can reuse them across denoising steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .vit import Attention, Mlp

# CogACT's sizes (action_model.py: DiT_S / DiT_B / DiT_L): depth, hidden size, heads.
DIT_SIZES = {"DiT-S": (6, 384, 4), "DiT-B": (12, 768, 12), "DiT-L": (24, 1024, 16)}


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    in_channels: int = 7  # action dimension
    token_size: int = 4096  # LLM width: the cognition feature
    future_action_window_size: int = 15  # chunk = future + 1 actions
    past_action_window_size: int = 0  # action history: unused by CogACT (must be 0)
    class_dropout_prob: float = 0.1  # > 0 creates the unconditional embedding
    frequency_embedding_size: int = 256

    def __post_init__(self):
        if self.past_action_window_size != 0:
            raise ValueError("DiTConfig.past_action_window_size must be 0 (as in CogACT)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiT hidden_size {self.hidden_size} not divisible by {self.num_heads} heads"
            )

    @property
    def chunk(self) -> int:
        return self.future_action_window_size + 1

    @staticmethod
    def named(size: str, **kw) -> DiTConfig:
        try:
            depth, hidden, heads = DIT_SIZES[size]
        except KeyError:
            raise ValueError(f"unknown DiT size {size!r}; known: {sorted(DIT_SIZES)}") from None
        return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, **kw)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the (integer) diffusion timestep, then a 2-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Linear(token_size -> d) of the cognition feature; holds the unconditional embedding.

    CogACT sizes `uncondition` as (1, 4096) whatever the LLM; we use (1, token_size), which is the
    same for every real (Llama-2-7B) checkpoint and also works for small LLMs.
    """

    def __init__(self, in_size: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(in_size, hidden_size)
        self.dropout_prob = dropout_prob
        if dropout_prob > 0:
            self.uncondition = nn.Parameter(torch.empty(1, in_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Inference only: guidance swaps in `uncondition` explicitly (see models/cogact.py).
        return self.linear(z)


class ActionEmbedder(nn.Module):
    def __init__(self, action_size: int, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(action_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class DiTBlock(nn.Module):
    """x + attn(norm1(x)), then + mlp(norm2(x)); LayerNorms without affine, tanh GELU."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), gelu_tanh=True)

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x))


class DiT(nn.Module):
    """Predicts the noise of x [B, T, C] at timesteps t [B] given conditions z [B, 1, token]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.in_channels = self.out_channels = cfg.in_channels  # learn_sigma is False in CogACT
        self.history_embedder = ActionEmbedder(cfg.in_channels, d)  # unused, as upstream
        self.x_embedder = ActionEmbedder(cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size)
        self.z_embedder = LabelEmbedder(cfg.token_size, d, cfg.class_dropout_prob)
        # One row for the condition token + one per predicted action (future + current).
        rows = cfg.future_action_window_size + cfg.past_action_window_size + 2
        self.positional_embedding = nn.Parameter(d**-0.5 * torch.randn(rows, d))
        self.blocks = nn.ModuleList(
            DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(d, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """CogACT's initialization (xavier linears, small embedders, zero final layer)."""

        def basic(m: nn.Module):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        for emb in (self.x_embedder, self.history_embedder, self.z_embedder):
            nn.init.normal_(emb.linear.weight, std=0.02)
            nn.init.zeros_(emb.linear.bias)
        if self.cfg.class_dropout_prob > 0:
            nn.init.normal_(self.z_embedder.uncondition, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def embed(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[condition token = t_emb + z_emb, embedded actions] + positions -> [B, T + 1, d]."""
        c = self.t_embedder(t)[:, None] + self.z_embedder(z)
        return torch.cat([c, self.x_embedder(x)], dim=1) + self.positional_embedding

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layer(h)[:, 1:]  # drop the condition token

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.embed(x, t, z)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def forward_flops(cfg: DiTConfig, batch: int) -> dict[str, int]:
    """Multiply-add FLOPs (2 per MAC) of one DiT forward on `batch` samples, by part:
    "embed" (action, timestep and condition embedders), "blocks" (all of them), "final"."""
    d, c, t = cfg.hidden_size, cfg.in_channels, cfg.chunk + 1  # + the condition token
    embed = cfg.chunk * c * d + cfg.frequency_embedding_size * d + d * d + cfg.token_size * d
    hidden = int(d * cfg.mlp_ratio)
    per_block = t * (4 * d * d + 2 * d * hidden) + 2 * t * t * d  # qkv+proj, mlp, QK^T and AV
    return {
        "embed": 2 * batch * embed,
        "blocks": 2 * batch * cfg.depth * per_block,
        "final": 2 * batch * t * d * c,
    }
