"""Architecture configs: what a VLA policy is made of, independent of its weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .vit import ViTConfig

# Image statistics of the two backbones (DINOv2: ImageNet; SigLIP: 0.5 / 0.5).
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VLAConfig:
    """An OpenVLA-shaped policy: fused DINOv2 + SigLIP ViTs -> MLP projector -> Llama."""

    name: str
    dino: ViTConfig
    siglip: ViTConfig
    llm: dict[str, Any]  # LlamaConfig keyword arguments
    tokenizer_vocab_size: int  # action tokens are its last n_action_bins ids (OpenVLA: 32000)
    n_action_bins: int = 256
    action_dim: int = 7
    # Appended after the prompt if the tokenizer didn't produce it (Llama's "▁", 29871).
    prompt_suffix_token_id: int | None = None
    image_means: tuple[tuple[float, ...], ...] = (DINO_MEAN, SIGLIP_MEAN)
    image_stds: tuple[tuple[float, ...], ...] = (DINO_STD, SIGLIP_STD)
    max_length: int = 2048
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return self.dino.image_size

    @property
    def num_patches(self) -> int:
        return self.dino.num_patches

    @property
    def vision_dim(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def llm_dim(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.llm["num_hidden_layers"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VLAConfig:
        d = dict(d)
        d["dino"] = ViTConfig(**d["dino"])
        d["siglip"] = ViTConfig(**d["siglip"])
        for key in ("image_means", "image_stds"):
            if key in d:
                d[key] = tuple(tuple(x) for x in d[key])
        return VLAConfig(**d)
