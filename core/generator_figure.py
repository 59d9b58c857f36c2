"""Side-by-side figure of one generated beat: input ECG, true and generated frames, LV area curves.

Drawn with Pillow alone (no plotting library at run time): a strip of the beat's ECG
window with the frame times marked, one row of frames per video (truth, one-frame prime,
reference-loop prime), and the LV area per frame of each row (segmenter masks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS = ((255, 255, 255), (255, 120, 80), (90, 200, 255))  # truth, image prime, loop prime


def _polyline(draw: ImageDraw.ImageDraw, values: np.ndarray, box: tuple[int, int, int, int], color: tuple[int, int, int], lo: float, hi: float) -> None:
    x0, y0, x1, y1 = box
    if len(values) < 2:
        return
    xs = np.linspace(x0, x1, len(values))
    ys = y1 - (np.asarray(values, dtype=np.float64) - lo) / max(hi - lo, 1e-9) * (y1 - y0)
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=color, width=2)


def beat_figure(
    path: str | Path,
    ecg: np.ndarray,
    ecg_valid: np.ndarray,
    frame_phase: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray]],
    areas: Sequence[np.ndarray],
    scale: int = 2,
) -> None:
    """ecg (S,) one lead of the window; frame_phase (F,) each frame's position in the window
    (0..1); rows: (label, frames (F, H, W) uint8), first the truth; areas: per row (F,)."""
    f, h, w = rows[0][1].shape
    gap = 4
    width = f * (w + gap) * scale
    strip = 80
    plot = 100
    label_h = 14
    height = strip + len(rows) * (h * scale + label_h) + plot + 3 * gap
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    # ECG strip, invalid samples dimmed, frame times as ticks
    sig = np.where(ecg_valid, ecg, np.nan)
    lo, hi = np.nanmin(sig) if np.isfinite(sig).any() else 0.0, np.nanmax(sig) if np.isfinite(sig).any() else 1.0
    _polyline(draw, np.nan_to_num(sig, nan=lo), (0, 4, width - 1, strip - 4), (120, 255, 120), lo, hi)
    for p in frame_phase:
        x = int(p * (width - 1))
        draw.line([(x, strip - 10), (x, strip)], fill=(200, 200, 0), width=1)
    y = strip + gap
    for (label, frames), color in zip(rows, COLORS):
        draw.text((2, y), label, fill=color)
        y += label_h
        for i, frame in enumerate(frames):
            tile = Image.fromarray(frame).resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
            image.paste(tile, (i * (w + gap) * scale, y))
        y += h * scale
    y += gap
    top = max(float(np.max(a)) for a in areas) * 1.05
    for a, color in zip(areas, COLORS):
        _polyline(draw, a, (0, y, width - 1, y + plot - 4), color, 0.0, top)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
