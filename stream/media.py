"""Pictures people look at: echo frames beside their ECG, MP4 files, contact sheets, plots.

Shared by `simulate --preview`, `replay`, `record` and `demo`, so every video EchoPulse
writes looks and encodes the same way. Pillow draws; imageio-ffmpeg (a wheel with its
own ffmpeg) encodes H.264.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

STRIP_HEIGHT = 96
ECG_GREEN = (80, 230, 120)
MARK_YELLOW = (230, 200, 60)
CURSOR_RED = (240, 70, 70)
BACKGROUND = (8, 12, 10)


def gray_to_rgb(frame: np.ndarray, side: int | None = None) -> np.ndarray:
    """A uint8 H×W frame as RGB, optionally resized (bilinear) to side×side."""
    from PIL import Image

    if side is not None and frame.shape != (side, side):
        frame = np.asarray(Image.fromarray(frame).resize((side, side), Image.BILINEAR))
    return np.repeat(frame[:, :, None], 3, axis=2)


def ecg_strip(
    ecg: np.ndarray,
    fs: float,
    t0: float,
    t1: float,
    width: int,
    *,
    height: int = STRIP_HEIGHT,
    ecg_t0: float = 0.0,
    cursor: float | None = None,
    marks: Sequence[float] | np.ndarray = (),
) -> np.ndarray:
    """An RGB strip (height × width) of one ECG lead between times t0 and t1.

    `ecg_t0` is the time of ecg[0]; `marks` (R peaks) are drawn as ticks and `cursor` as a
    red line. The vertical scale follows the visible signal, robust to spikes.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    i0 = max(int(np.floor((t0 - ecg_t0) * fs)), 0)
    i1 = min(int(np.ceil((t1 - ecg_t0) * fs)) + 1, ecg.shape[-1])
    seg = ecg[i0:i1]
    if len(seg) > 1:
        lo, hi = np.percentile(seg, 1), np.percentile(seg, 99.5)
        span = max(hi - lo, 0.2)
        x = (ecg_t0 + np.arange(i0, i1) / fs - t0) / (t1 - t0) * (width - 1)
        y = (height - 8) - (seg - lo) / span * (height - 16)
        draw.line(list(zip(x.tolist(), y.tolist())), fill=ECG_GREEN, width=1)
    for r in marks:
        if t0 <= r <= t1:
            xr = (r - t0) / (t1 - t0) * (width - 1)
            draw.line([(xr, 0), (xr, 6)], fill=MARK_YELLOW, width=2)
    if cursor is not None and t0 <= cursor <= t1:
        xc = (cursor - t0) / (t1 - t0) * (width - 1)
        draw.line([(xc, 0), (xc, height)], fill=CURSOR_RED, width=2)
    return np.asarray(img)


def label(image: np.ndarray, text: str, xy: tuple[int, int] = (4, 2), fill: tuple[int, int, int] = (255, 220, 80)) -> np.ndarray:
    """A copy of an RGB image with `text` drawn on it (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(image)
    ImageDraw.Draw(img).text(xy, text, fill=fill)
    return np.asarray(img)


def write_mp4(path: str | Path, frames: Iterable[np.ndarray], fps: float) -> int:
    """Encode RGB (or gray) uint8 frames as H.264; returns the number written.

    yuv420p needs even sides: odd frames are padded with one black row/column rather than
    rescaled, so pixels stay where they were drawn.
    """
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1, pixelformat="yuv420p") as writer:
        for frame in frames:
            if frame.ndim == 2:
                frame = gray_to_rgb(frame)
            pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))
            writer.append_data(frame)
            count += 1
    return count


def line_plot(
    series: Sequence[tuple[np.ndarray, np.ndarray, tuple[int, int, int], str]],
    width: int = 900,
    height: int = 180,
    t_range: tuple[float, float] | None = None,
    marks: Sequence[float] | np.ndarray = (),
    title: str = "",
) -> np.ndarray:
    """One RGB panel with each (t, y, colour, name) series scaled to the panel's height.

    Series share the time axis but each keeps its own vertical scale (an LV area beside an
    ECG in mV); their names go in the legend with the title.
    """
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if t_range is None:
        t_range = (min(float(t[0]) for t, *_ in series), max(float(t[-1]) for t, *_ in series))
    t0, t1 = t_range
    span_t = max(t1 - t0, 1e-9)
    for r in marks:
        if t0 <= r <= t1:
            x = (r - t0) / span_t * (width - 1)
            draw.line([(x, 14), (x, height)], fill=(60, 60, 40), width=1)
    for t, y, colour, _ in series:
        keep = (t >= t0) & (t <= t1) & np.isfinite(y)
        if keep.sum() < 2:
            continue
        lo, hi = np.percentile(y[keep], 0.5), np.percentile(y[keep], 99.5)
        span = max(hi - lo, 1e-9)
        x = (t[keep] - t0) / span_t * (width - 1)
        yy = (height - 6) - (y[keep] - lo) / span * (height - 26)
        draw.line(list(zip(x.tolist(), yy.tolist())), fill=colour, width=2)
    legend = "   ".join(name for *_, name in series)
    draw.text((6, 2), f"{title}   {legend}".strip(), fill=(220, 220, 220))
    return np.asarray(img)


def save_png(path: str | Path, image: np.ndarray) -> None:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
