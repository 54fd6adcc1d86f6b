"""Action heads: what turns the LLM prefill into actions. A Policy holds one (composition):
token decoding for OpenVLA (tokens.py), DiT denoising for CogACT (diffusion.py)."""

from .base import ActionHead, HeadOutput
from .diffusion import AdaptiveEnsembler, DiffusionHead
from .tokens import TokenDecodingHead

__all__ = ["ActionHead", "AdaptiveEnsembler", "DiffusionHead", "HeadOutput", "TokenDecodingHead"]
