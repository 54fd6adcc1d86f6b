"""Named architectures: tiny (tests, CPU demos), small (CPU benchmarks), full size (GPU latency).

Full-size presets are built on the meta device by default: latency does not depend on weight
values, and a 7 B model should not allocate 30 GB just to count parameters or FLOPs.
"""

from __future__ import annotations

from dataclasses import replace

from .arch import VLAConfig
from .vit import ViTConfig

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,  # 32000 + pad token, padded to a multiple of 64
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    pad_token_id=32000,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _small_llm(width: int, layers: int, heads: int, vocab: int) -> dict:
    return dict(
        LLAMA2_7B,
        hidden_size=width,
        intermediate_size=int(width * 11008 / 4096) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab + 64,  # like OpenVLA: room for a pad token, a multiple of 64
        pad_token_id=vocab,
        max_position_embeddings=512,
    )


def _dino(width: int, depth: int, heads: int) -> ViTConfig:
    return ViTConfig(width, depth, heads, 4 * width, reg_tokens=4, layer_scale=True)


def _siglip(width: int, depth: int, heads: int) -> ViTConfig:
    return ViTConfig(width, depth, heads, int(width * 3.7362), class_token=False, attn_pool=True)


# Tokenizer vocabulary of our small word-level tokenizers (words + 256 action tokens on top).
SMALL_TOKENIZER_VOCAB = 512

PRESETS: dict[str, VLAConfig] = {
    "tiny-openvla": VLAConfig(
        name="tiny-openvla",
        dino=_dino(64, 3, 2),
        siglip=_siglip(96, 3, 2),
        llm=_small_llm(256, 4, 4, SMALL_TOKENIZER_VOCAB),
        tokenizer_vocab_size=SMALL_TOKENIZER_VOCAB,
        max_length=512,
    ),
    # tiny-openvla at 112x112 (64 visual tokens): the shipped embedded-suite policy. A quarter
    # of the tokens makes CPU training ~4x cheaper per sample; the suite renders at 128x128.
    "tiny-openvla-112": VLAConfig(
        name="tiny-openvla-112",
        dino=replace(_dino(64, 3, 2), image_size=112),
        siglip=replace(_siglip(96, 3, 2), image_size=112),
        llm=_small_llm(256, 4, 4, SMALL_TOKENIZER_VOCAB),
        tokenizer_vocab_size=SMALL_TOKENIZER_VOCAB,
        max_length=512,
    ),
    "small-openvla": VLAConfig(
        name="small-openvla",
        dino=_dino(192, 6, 3),
        siglip=_siglip(256, 6, 4),
        llm=_small_llm(512, 12, 8, SMALL_TOKENIZER_VOCAB),
        tokenizer_vocab_size=SMALL_TOKENIZER_VOCAB,
        max_length=512,
    ),
    "openvla-7b": VLAConfig(
        name="openvla-7b",
        dino=_dino(1024, 24, 16),
        siglip=ViTConfig(1152, 27, 16, 4304, class_token=False, attn_pool=True),
        llm=LLAMA2_7B,
        tokenizer_vocab_size=32000,
        prompt_suffix_token_id=29871,
    ),
}

FULL_SIZE = {"openvla-7b"}


def get_preset(name: str) -> VLAConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown policy preset {name!r}; known: {sorted(PRESETS)}") from None


# -- CogACT: the same backbones + a DiT action head (models/cogact.py) -------------------------


def _cogact_presets() -> dict[str, VLAConfig]:
    from .cogact import cogact_config
    from .dit import DiTConfig

    tiny = PRESETS["tiny-openvla"]
    tiny_dit = DiTConfig(depth=2, hidden_size=128, num_heads=4, token_size=tiny.llm_dim)
    return {
        "tiny-cogact": cogact_config(tiny, dit=tiny_dit, name="tiny-cogact"),
        "tiny-cogact-112": cogact_config(
            PRESETS["tiny-openvla-112"], dit=tiny_dit, name="tiny-cogact-112"
        ),
        "small-cogact": cogact_config(PRESETS["small-openvla"], dit="DiT-S", name="small-cogact"),
        "cogact-base": cogact_config(PRESETS["openvla-7b"], dit="DiT-B", name="cogact-base"),
    }


PRESETS.update(_cogact_presets())
FULL_SIZE.add("cogact-base")
