"""`echopulse reference`: check a patient's echo loop before it primes a device.

    echopulse reference FILE[?frames=A:B&crop=X,Y,W,H&fit=crop|pad] [--png OUT.png] [--json OUT.json]

Reads the loop exactly as `serve --reference` and `replay --reference` will (which frames
make the cycle, at the model's size), segments the left ventricle in every frame with
the shipped LV segmenter and prints the loop's EF (method of discs), its end-diastolic
and end-systolic frames, and what looks wrong: no LV found (not an apical four-chamber
view), a cycle that does not start at end-diastole, a loop that hardly contracts.
--png draws the frames with the LV outlined above the LV area curve. Exit status 0 when
the file was read (warnings or not), 2 when it cannot be.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
import numpy as np

from ._targets import check_outputs
from .args import CliError

log = logging.getLogger(__name__)

OUTLINE = (255, 90, 60)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reference", help="check a patient's echo loop (EF, end-diastole, view) before using it",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="FILE", help="DICOM cine, video or NumPy file, optionally ?frames=A:B&crop=&fit=")
    p.add_argument("--png", default=None, help="write the frames with the LV outlined and the LV area curve here")
    p.add_argument("--json", default=None, help="write the measurements and warnings here")
    p.add_argument("--segmenter", default=None, help="LV segmenter folder (default: the shipped one)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ...core.generator import DEFAULT_WEIGHTS
    from ...core.lv_segmenter import load_segmenter
    from ...core.reference_check import check_loop
    from ...core.reference_loop import ReferenceLoopError, load_reference_loop

    for option in ("png", "json"):
        target = getattr(args, option)
        if target is not None and not Path(target).parent.is_dir():
            raise CliError(f"--{option}: folder {Path(target).parent} does not exist")
    check_outputs({"--png": args.png, "--json": args.json})
    try:
        segmenter = load_segmenter(args.segmenter or DEFAULT_WEIGHTS)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(f"--segmenter: {err}") from None
    size = _model_size(DEFAULT_WEIGHTS)
    try:
        loop = load_reference_loop(args.path, size)
    except ReferenceLoopError as err:
        raise CliError(str(err)) from None
    masks = segmenter.masks(loop.frames)  # once: the check and the figure both read them
    check = check_loop(loop.frames, segmenter, masks)
    print(loop.describe())
    print(f"EF {check.ef:.1f} % (method of discs on the shipped LV segmenter's masks), "
          f"end-diastole at frame {check.ed_frame}, end-systole at frame {check.es_frame}")
    for warning in check.warnings:
        print(f"warning: {warning}")
    try:
        if args.json:
            report = {"file": str(loop.path), "cycle": loop.cycle, "fps": loop.fps, "size": size, **check.as_dict()}
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        if args.png:
            from .. import media

            media.save_png(args.png, _figure(loop.frames, masks, np.asarray(check.lv_area)))
    except OSError as err:
        raise CliError(f"cannot write {err.filename or 'the output'}: {err.strerror or err}") from None
    return 0


def _model_size(weights: Path) -> int:
    """The frame side the shipped generator reads (its tokenizer's image size)."""
    from ...core.checkpoint import load_preset

    return int(load_preset(weights / "tokenizer.json", "tokenizer").tokenizer.image_size)


def _figure(frames: np.ndarray, masks: np.ndarray, area: np.ndarray, tile: int = 96, per_row: int = 10) -> np.ndarray:
    """Frames in rows with the LV outline drawn, the LV area curve below."""
    from .. import media

    tiles = [media.label(_outlined(frame, mask, tile), str(i)) for i, (frame, mask) in enumerate(zip(frames, masks))]
    rows = []
    for start in range(0, len(tiles), per_row):
        row = tiles[start:start + per_row]
        row += [np.zeros_like(tiles[0])] * (per_row - len(row))
        rows.append(np.concatenate(row, axis=1))
    sheet = np.concatenate(rows, axis=0)
    index = np.arange(len(area), dtype=np.float64)
    curve = media.line_plot([(index, area, OUTLINE, "LV area")], width=sheet.shape[1], height=140,
                            title="frame 0 = end-diastole (R) expected at the largest area")
    return np.concatenate([sheet, curve], axis=0)


def _outlined(frame: np.ndarray, mask: np.ndarray, tile: int) -> np.ndarray:
    """One frame as an RGB tile with the mask's edge in colour."""
    from PIL import Image

    from .. import media

    rgb = media.gray_to_rgb(frame).copy()
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    rgb[mask & ~inner] = OUTLINE
    return np.asarray(Image.fromarray(rgb).resize((tile, tile), Image.NEAREST))
