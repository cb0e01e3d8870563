"""Small inline heat maps for the attribution results' notebook rendering.

A map becomes a PNG (written with ``zlib``, no plotting library in the core)
inside an ``<img>`` tag: signed maps (attributions, gradients) in blue-white-red
around 0, non-negative maps (Grad-CAM) in white-to-red, each scaled to its own
largest absolute value.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib

import numpy as np

#: Samples shown at most.
MAX_SAMPLES = 8

#: Displayed size of the longer side, in CSS pixels (the PNG is scaled without smoothing).
DISPLAY_PIXELS = 96


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (height, width, 3), values in [0, 255]."""
    height, width = rgb.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.astype(np.uint8).reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def colours(values: np.ndarray, signed: bool) -> np.ndarray:
    """RGB of a 2-D map: blue (negative) - white (0) - red (positive), or white - red for ``signed=False``."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    scale = float(np.max(np.abs(values))) or 1.0
    v = np.clip(values / scale, -1.0, 1.0)
    positive, negative = np.clip(v, 0, 1), np.clip(-v, 0, 1) if signed else np.zeros_like(v)
    red = 255 * (1 - negative)
    green = 255 * (1 - positive - negative)
    blue = 255 * (1 - positive)
    return np.stack([red, green, blue], axis=-1).round()


def as_maps(array: np.ndarray) -> np.ndarray | None:
    """One 2-D map per sample: images summed over channels, 2-D samples as they are; ``None`` otherwise."""
    if array.ndim == 4:
        return array.sum(axis=-1)
    if array.ndim == 3:
        return array
    return None


def strip(maps: np.ndarray | None, signed: bool, label: str) -> str:
    """An HTML row of inline heat maps, one per sample (the first :data:`MAX_SAMPLES`); ``""`` for no maps."""
    if maps is None or maps.ndim != 3 or 0 in maps.shape:
        return ""
    height, width = maps.shape[1:]
    scale = DISPLAY_PIXELS / max(height, width)
    size = f"width:{round(width * scale)}px;height:{round(height * scale)}px"
    images = []
    for i, sample in enumerate(maps[:MAX_SAMPLES]):
        data = base64.b64encode(png(colours(sample, signed))).decode("ascii")
        images.append(
            f'<figure style="display:inline-block;margin:2px 6px;text-align:center">'
            f'<img src="data:image/png;base64,{data}" style="{size};image-rendering:pixelated" alt="sample {i}">'
            f'<figcaption style="font-size:smaller">sample {i}</figcaption></figure>'
        )
    more = f" (first {MAX_SAMPLES} of {len(maps)})" if len(maps) > MAX_SAMPLES else ""
    key = "red: raises the output, blue: lowers it" if signed else "red: where the output looks"
    caption = html.escape(f"{label}{more}: {key}")
    return f'<div class="gradmagic-maps"><div>{caption}</div>{"".join(images)}</div>'
