"""Pictures of token selection: kept visual tokens over the camera image, coloured by origin.

Dropped patches are dimmed; kept ones get a border: blue = semantic set only, red = action set
only, magenta = both, green = a method that doesn't label origins (fastv, random, ...).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

ORIGIN_COLOURS = {0: (40, 200, 80), 1: (60, 120, 255), 2: (255, 60, 60), 3: (230, 60, 230)}
LEGEND = [("semantic", 1), ("action", 2), ("both", 3)]


def overlay(
    image: np.ndarray,
    kept: np.ndarray | None,
    origin: np.ndarray | None = None,
    grid: tuple[int, int] = (16, 16),
    size: int = 448,
    title: str = "",
) -> Image.Image:
    """Camera frame with the kept tokens of a row-major `grid` marked; returns a PIL image."""
    rows, cols = grid
    frame = Image.fromarray(image).convert("RGB").resize((size, size), Image.NEAREST)
    ph, pw = size / rows, size / cols
    if kept is not None:
        keep_mask = np.zeros(rows * cols, dtype=bool)
        keep_mask[np.asarray(kept)] = True
        arr = np.asarray(frame).astype(np.float32)
        for idx in np.flatnonzero(~keep_mask):  # dim what the LLM never sees after layer K
            r, c = divmod(int(idx), cols)
            arr[round(r * ph) : round((r + 1) * ph), round(c * pw) : round((c + 1) * pw)] *= 0.3
        frame = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(frame)
        labels = np.zeros(len(kept), dtype=int) if origin is None else np.asarray(origin)
        for idx, lab in zip(np.asarray(kept), labels):
            r, c = divmod(int(idx), cols)
            box = (c * pw, r * ph, (c + 1) * pw - 1, (r + 1) * ph - 1)
            draw.rectangle(box, outline=ORIGIN_COLOURS[int(lab)], width=2)
    header = 44  # two text lines: title, then the legend
    canvas = Image.new("RGB", (size, size + header), (255, 255, 255))
    canvas.paste(frame, (0, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 6), title, fill=(0, 0, 0))
    if origin is not None:
        x = 6
        for name, lab in LEGEND:
            draw.rectangle((x, 25, x + 10, 35), outline=ORIGIN_COLOURS[lab], width=2)
            draw.text((x + 14, 24), name, fill=(0, 0, 0))
            x += 80
    return canvas
