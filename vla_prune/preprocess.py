"""Camera frame + instruction -> model inputs, with clear errors for bad input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

MAX_IMAGE_SIDE = 4096
MAX_INSTRUCTION_CHARS = 2000


class InputError(ValueError):
    """A bad image or instruction; nothing was run and no state changed."""


def validate_image(image: object) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        raise InputError("image must be a numpy array (HxWx3 uint8), got a torch.Tensor")
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array (HxWx3 uint8), got {type(image).__name__}")
    if image.ndim != 3:
        raise InputError(f"image must have shape HxWx3, got shape {image.shape}")
    if image.shape[2] != 3:
        hint = " (drop the alpha channel: image[..., :3])" if image.shape[2] == 4 else ""
        raise InputError(f"image must have 3 channels (RGB), got {image.shape[2]}{hint}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise InputError(f"image ({image.dtype}) contains NaN or inf values")
        raise InputError(
            f"image dtype must be uint8, got {image.dtype} "
            "(convert floats in [0, 1] with (img * 255).round().astype(np.uint8))"
        )
    h, w = image.shape[:2]
    if h < 2 or w < 2 or h > MAX_IMAGE_SIDE or w > MAX_IMAGE_SIDE:
        raise InputError(f"image size {h}x{w} out of range [2, {MAX_IMAGE_SIDE}] per side")
    return image


def validate_instruction(instruction: object) -> str:
    if not isinstance(instruction, str):
        raise InputError(f"instruction must be a str, got {type(instruction).__name__}")
    if not instruction.strip():
        raise InputError("instruction is empty")
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise InputError(
            f"instruction has {len(instruction)} characters; the limit is {MAX_INSTRUCTION_CHARS}"
        )
    return instruction.strip()


def image_to_pixels(
    image: np.ndarray,
    size: int,
    means: Sequence[Sequence[float]],
    stds: Sequence[Sequence[float]],
) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3 * len(means), size, size]: resized once, normalized per backbone.

    Resizing uses PIL bicubic, as upstream's "resize-naive" strategy does.
    """
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0  # (a writable copy)
    chans = [
        (x - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]
        for m, s in zip(means, stds)
    ]
    return torch.cat(chans, dim=0)[None]
