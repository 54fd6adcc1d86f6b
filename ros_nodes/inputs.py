"""Camera and instruction messages -> policy inputs, or a rejection with a counted reason.

Works on the message fields only (duck-typed), so it needs no ROS import and is cheap to test.
Every check runs before anything large is allocated: a message that claims a 50000-pixel side
is rejected from its header, not after decoding.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

# encoding -> (channels, numpy dtype, channel order to RGB)
ENCODINGS: dict[str, tuple[int, str, tuple[int, ...]]] = {
    "rgb8": (3, "u1", (0, 1, 2)),
    "bgr8": (3, "u1", (2, 1, 0)),
    "rgba8": (4, "u1", (0, 1, 2)),
    "bgra8": (4, "u1", (2, 1, 0)),
    "32FC3": (3, "f4", (0, 1, 2)),  # RGB floats in [0, 1] (clipped)
}
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")


class Rejected(ValueError):
    """A message the node will not act on; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    max_side: int = 1024
    max_instruction_chars: int = 1000


def decode_image(msg: Any, limits: Limits) -> np.ndarray:
    """sensor_msgs/Image -> HxWx3 uint8 RGB (a copy), or raise Rejected."""
    enc = str(msg.encoding)
    if enc not in ENCODINGS:
        raise Rejected("bad_encoding", f"encoding {enc!r} not in {sorted(ENCODINGS)}")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h < 2 or w < 2:
        raise Rejected("bad_size", f"image {h}x{w} is smaller than 2x2")
    if max(h, w) > limits.max_side:
        raise Rejected("image_too_large", f"image {h}x{w} exceeds max side {limits.max_side}")
    n = len(msg.data)
    if n == 0:
        raise Rejected("empty_data", f"image {h}x{w} {enc} has no data")
    channels, kind, order = ENCODINGS[enc]
    itemsize = np.dtype(kind).itemsize
    row = w * channels * itemsize
    if step < row:
        raise Rejected("bad_step", f"step {step} < width {w} x {channels * itemsize} bytes")
    if n != step * h:
        raise Rejected("size_mismatch", f"data has {n} bytes, step x height = {step * h}")
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    rows = np.frombuffer(msg.data, np.uint8).reshape(h, step)[:, :row]
    pixels = rows.copy().view(dtype).reshape(h, w, channels)
    rgb = pixels[..., list(order)]
    if kind == "f4":
        if not np.isfinite(rgb).all():
            raise Rejected("non_finite", f"{enc} image contains NaN or inf")
        rgb = (np.clip(rgb, 0.0, 1.0) * 255.0).round()
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def decode_compressed(msg: Any, limits: Limits) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> HxWx3 uint8 RGB, or raise Rejected."""
    from PIL import Image, UnidentifiedImageError

    fmt = str(msg.format).lower()
    # image_transport writes e.g. "rgb8; jpeg compressed bgr8": any known codec name will do.
    if not any(f in fmt for f in COMPRESSED_FORMATS):
        raise Rejected("bad_encoding", f"compressed format {msg.format!r} is not jpeg or png")
    if len(msg.data) == 0:
        raise Rejected("empty_data", "compressed image has no data")
    try:
        with Image.open(io.BytesIO(bytes(msg.data))) as im:
            w, h = im.size  # read from the header: nothing decoded yet
            if max(h, w) > limits.max_side:
                raise Rejected(
                    "image_too_large", f"image {h}x{w} exceeds max side {limits.max_side}"
                )
            if h < 2 or w < 2:
                raise Rejected("bad_size", f"image {h}x{w} is smaller than 2x2")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Rejected:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise Rejected("bad_compressed", f"cannot decode {msg.format!r}: {e}") from None


def check_instruction(text: Any, limits: Limits) -> str:
    text = str(text)
    if not text.strip():
        raise Rejected("empty_instruction", "instruction is empty")
    if len(text) > limits.max_instruction_chars:
        raise Rejected(
            "instruction_too_long",
            f"instruction has {len(text)} characters (max {limits.max_instruction_chars})",
        )
    if "\x00" in text:
        raise Rejected("bad_instruction", "instruction contains a NUL character")
    return text.strip()


def stamp_age_ms(stamp_ns: int, now_ns: int) -> float:
    """Age of a header stamp; an unset (zero) stamp counts as infinitely old."""
    if stamp_ns <= 0:
        return float("inf")
    return (now_ns - stamp_ns) / 1e6


def check_stamp(stamp_ns: int, now_ns: int, max_age_ms: float) -> None:
    age = stamp_age_ms(stamp_ns, now_ns)
    if age > max_age_ms:
        what = "unset" if stamp_ns <= 0 else f"{age:.1f} ms old"
        raise Rejected("stale_image", f"header stamp {what} (max {max_age_ms:g} ms)")
    if age < -max_age_ms:
        raise Rejected("future_stamp", f"header stamp {-age:.1f} ms in the future")
