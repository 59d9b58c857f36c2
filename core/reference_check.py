"""Is this echo loop a usable reference? What the generator will read from it, checked.

A reference loop primes the generator with a patient's heart (`core/reference_loop.py`);
the generated video then contracts like it. Before a clinician trusts that, three things
are worth seeing: that the LV is found in every frame (the view is the apical
four-chamber view the model knows), that the cycle starts at end-diastole (the largest
LV, at R), and how strongly the loop contracts (its EF by the method of discs, from the
shipped LV segmenter, which was trained on simulated echo).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .lv_segmenter import LvSegmenter
from .simulate.measure import disc_volumes, ejection_fraction

MIN_LV_FRACTION = 0.005  # an LV mask smaller than this share of the frame counts as not found
MIN_LARGEST_SHARE = 0.8  # the LV is one region; a mask in scattered pieces is not an LV
MIN_EF = 5.0             # below it the loop hardly contracts: a still frame, or the wrong view
ED_TOLERANCE = 0.15      # of the cycle: on simulated loops the largest LV lies within 0.12 of R
# Mean |second difference| of the LV area over its range. On simulated cycles: up to 0.10 at
# 16+ frames a cycle, 0.29 at 10; scattered masks (noise, an upside-down or rotated view)
# gave 0.34-0.48 and frames out of order 0.87.
MAX_ROUGHNESS = {16: 0.3, 0: 0.5}  # by frames in the cycle, at least


@dataclass
class LoopCheck:
    frames: int
    ef: float                      # % by the method of discs on the segmenter's masks
    ed_frame: int                  # largest LV volume
    es_frame: int                  # smallest LV volume
    lv_area: list[float]           # LV area per frame, share of the frame
    frames_without_lv: int         # no mask, or one in scattered pieces
    roughness: float               # how much the LV area jumps frame to frame (see MAX_ROUGHNESS)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _largest_share(mask: np.ndarray) -> float:
    labels, count = ndimage.label(mask)
    if count == 0:
        return 0.0
    return float(np.bincount(labels.ravel())[1:].max() / mask.sum())


def check_loop(frames: np.ndarray, segmenter: LvSegmenter, masks: np.ndarray | None = None) -> LoopCheck:
    """Measure one cycle (uint8 T×H×W, end-diastole first) and say what looks wrong.
    `masks`: the segmenter's masks of `frames` when the caller has them already."""
    masks = segmenter.masks(frames) if masks is None else masks
    count = len(frames)
    area = masks.reshape(count, -1).mean(axis=1)
    found = (area >= MIN_LV_FRACTION) & np.array([_largest_share(m) >= MIN_LARGEST_SHARE for m in masks])
    volumes = disc_volumes(masks, 1.0)  # EF is a ratio: the pixel size cancels
    top = float(volumes.max())
    ef = ejection_fraction(top, float(volumes.min())) if top > 0 else 0.0
    ed, es = int(np.argmax(volumes)), int(np.argmin(volumes))
    spread = float(area.max() - area.min())
    roughness = float(np.abs(np.diff(area, 2)).mean() / spread) if count >= 3 and spread > 0 else 0.0
    check = LoopCheck(frames=count, ef=ef, ed_frame=ed, es_frame=es, lv_area=[float(a) for a in area],
                      frames_without_lv=int((~found).sum()), roughness=roughness)
    limit = next(v for n, v in sorted(MAX_ROUGHNESS.items(), reverse=True) if count >= n)
    if check.frames_without_lv:
        check.warnings.append(
            f"no left ventricle found in {check.frames_without_lv} of {count} frames: the model knows the apical "
            "four-chamber view, apex at the top; is this one?")
    elif ef < MIN_EF:
        check.warnings.append(f"the LV hardly changes over the loop (EF {ef:.1f} %): a still image, or not one whole cycle?")
    elif roughness > limit:
        check.warnings.append(
            f"the LV area jumps from frame to frame (roughness {roughness:.2f} > {limit}): frames out of order, "
            "or not an apical four-chamber view?")
    elif min(ed, count - ed) > max(1, int(np.ceil(ED_TOLERANCE * count))):
        # End-diastole sits at R: the first frame, or one step around the cycle, the last.
        shift = f"{ed} frames later" if ed <= count // 2 else f"{count - ed} frames earlier"
        check.warnings.append(
            f"the largest LV is at frame {ed}, not at the first: the cycle should start at end-diastole (R); "
            f"with ?frames=A:B, move A and B {shift}")
    return check
