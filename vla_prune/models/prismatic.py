"""The Prismatic/OpenVLA module tree: vision_backbone (fused ViTs) -> projector -> language_model.

Module names follow OpenVLA's Hugging Face checkpoints so weights map 1:1:
vision_backbone.featurizer.*, vision_backbone.fused_featurizer.*, projector.fc1..fc3,
language_model.model.*, language_model.lm_head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .arch import VLAConfig
from .vit import VisionTransformer


class FusedVisionBackbone(nn.Module):
    """DINOv2 and SigLIP on the same image; patch features concatenated -> [B, 256, 2176]."""

    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.featurizer = VisionTransformer(cfg.dino)
        self.fused_featurizer = VisionTransformer(cfg.siglip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # 6 channels: the image normalized with DINO stats, then with SigLIP stats.
        dino, siglip = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(dino), self.fused_featurizer(siglip)], dim=2)


class Projector(nn.Module):
    """OpenVLA's fused-gelu-mlp: vision_dim -> 4*vision_dim -> llm_dim -> llm_dim."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


def llama_config(cfg: VLAConfig) -> LlamaConfig:
    lc = LlamaConfig(**cfg.llm)
    lc._attn_implementation = "sdpa"  # used only by reference paths; our engine calls SDPA itself
    return lc


class OpenVLAModel(nn.Module):
    def __init__(self, cfg: VLAConfig):
        super().__init__()
        self.config = cfg
        self.vision_backbone = FusedVisionBackbone(cfg)
        self.projector = Projector(cfg.vision_dim, cfg.llm_dim)
        self.language_model = LlamaForCausalLM(llama_config(cfg))

    def embed_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[BOS] + projected patches + the rest of the text, exactly as OpenVLA builds it."""
        patches = self.projector(self.vision_backbone(pixel_values))
        text = self.language_model.get_input_embeddings()(input_ids)
        return torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
