"""One simulated patient: function, anatomy, ECG morphology and image quality, drawn from a seed.

Parameters follow physiology the way patients do: a low ejection fraction comes with a
dilated, more spherical ventricle, thinner walls and a wider QRS, so what a model sees in
the ECG and in the image carries information about the EF.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .ecg import EcgMorphology
from .timing import HR_MAX, HR_MIN

EF_MIN, EF_MAX = 5.0, 90.0
VIEWS = ("a4c", "a2c")

# How a reduced EF remodels the heart (`sick` = 0 for a normal heart, 1 for severe
# dysfunction). Named here because `ef_posterior` reads the same numbers: what an end-
# diastolic frame and the ECG reveal of the EF follows from them and nothing else.
EF_CLASSES = ((0.55, 52.0, 75.0), (0.20, 40.0, 52.0), (0.25, 15.0, 40.0))  # (weight, low, high)
SICK_EF_NORMAL, SICK_EF_SPAN = 55.0, 35.0   # sick = clip((55 - EF) / 35, 0, 1)
BODY = (0.85, 1.15)                          # EDV scale of body size
EDV_BASE = (85.0, 140.0)                     # ml
DILATION, DILATION_POWER = (0.6, 1.2), 1.2   # EDV × (1 + sick^1.2 × U(0.6, 1.2))
HR_MEAN, HR_PER_SICK, HR_SD, HR_CLIP = 72.0, 8.0, 12.0, (45.0, 120.0)
QRS_BASE, QRS_PER_SICK, QRS_SPREAD, QRS_SD, QRS_CLIP = 0.09, 0.05, (0.3, 1.5), 0.008, (0.07, 0.18)
WALL, WALL_THINNING = (0.85, 1.15), 0.35     # cm × (1 - 0.35 sick)
SPHERICITY, SPHERICITY_PER_SICK = (0.26, 0.31), 0.09
DEPTH, DEPTH_PER_SICK = (14.5, 17.0), 1.0    # cm
LA, LA_PER_SICK = (0.85, 1.1), 0.2           # × (1 + 0.2 sick)


def sickness(ef: float | np.ndarray) -> float | np.ndarray:
    """0 for a normal heart (EF >= 55 %), rising to 1 at EF 20 %: drives remodelling."""
    return np.clip((SICK_EF_NORMAL - ef) / SICK_EF_SPAN, 0.0, 1.0)


@dataclass
class Subject:
    seed: int
    view: str
    ef: float                 # percent
    edv: float                # ml
    hr: float                 # bpm (mean)
    qrs: float                # s
    wall: float               # cm, LV wall thickness at end-diastole
    sphericity: float         # LV half-width / cavity length at ED (0.25 normal, ~0.4 spherical)
    rv_scale: float           # RV width relative to the LV's
    apex_depth: float         # cm from the probe to the epicardial apex
    depth: float              # cm, imaging depth
    sector_deg: float         # full sector angle
    tilt_deg: float           # LV long axis angle from the sector's centre line (+ = base to the
                              # right; in A4C this leaves the septum near the centre, the RV left)
    la_scale: float           # atrial size relative to the LV width
    gain_db: float            # overall gain offset
    noise: float              # electronic noise level (linear, relative to myocardium)
    clutter: float            # near-field haze / reverberation level
    lateral_dropout: float    # 0..1 echo loss of the lateral wall (beam parallel to it)
    ecg: EcgMorphology = field(default_factory=EcgMorphology)

    @property
    def esv(self) -> float:
        return self.edv * (1.0 - self.ef / 100.0)

    @property
    def sv(self) -> float:
        return self.edv - self.esv


def _draw_ef(rng: np.random.Generator) -> float:
    """Mixture over clinical classes: mostly normal, a good share mildly and severely reduced."""
    u = rng.random()
    edge = 0.0
    for weight, low, high in EF_CLASSES:
        edge += weight
        if u < edge:
            return rng.uniform(low, high)
    return rng.uniform(EF_CLASSES[-1][1], EF_CLASSES[-1][2])  # u at the top edge (rounding)


def sample_subject(seed: int, ef: float | None = None, hr: float | None = None, view: str = "a4c", noise: float = 1.0) -> Subject:
    """Draw a subject from `seed`; `ef` (5..90 %) and `hr` (30..200 bpm) fix those values."""
    if int(seed) < 0:
        raise ValueError(f"seed must be 0 or more, got {seed}")
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    if ef is not None and not EF_MIN <= ef <= EF_MAX:
        raise ValueError(f"ef must be within {EF_MIN:g}..{EF_MAX:g} %, got {ef}")
    if hr is not None and not HR_MIN <= hr <= HR_MAX:
        raise ValueError(f"hr must be within {HR_MIN:g}..{HR_MAX:g} bpm, got {hr}")
    if not (np.isfinite(noise) and noise >= 0):  # a negative scale would flip noise levels' signs
        raise ValueError(f"noise must be 0 or more, got {noise}")
    rng = np.random.default_rng([int(seed), 0x5EC0])
    ef_v = float(ef) if ef is not None else _draw_ef(rng)
    sick = float(sickness(ef_v))
    body = rng.uniform(*BODY)
    edv = body * rng.uniform(*EDV_BASE) * (1.0 + 1.0 * sick ** DILATION_POWER * rng.uniform(*DILATION))
    hr_v = float(hr) if hr is not None else float(np.clip(rng.normal(HR_MEAN + HR_PER_SICK * sick, HR_SD), *HR_CLIP))
    qrs = float(np.clip(rng.normal(QRS_BASE + QRS_PER_SICK * sick * rng.uniform(*QRS_SPREAD), QRS_SD), *QRS_CLIP))
    ecg = EcgMorphology.sample(rng, qrs=qrs, noise=noise)
    return Subject(
        seed=int(seed),
        view=view,
        ef=ef_v,
        edv=float(edv),
        hr=hr_v,
        qrs=qrs,
        wall=float(rng.uniform(*WALL) * (1.0 - WALL_THINNING * sick)),
        sphericity=float(rng.uniform(*SPHERICITY) + SPHERICITY_PER_SICK * sick),
        rv_scale=float(rng.uniform(0.6, 0.85)),
        apex_depth=float(rng.uniform(1.4, 2.6)),
        depth=float(rng.uniform(*DEPTH) + DEPTH_PER_SICK * sick),
        sector_deg=float(rng.uniform(75.0, 90.0)),
        tilt_deg=float(rng.normal(11.0 if view == "a4c" else 2.0, 3.0)),
        la_scale=float(rng.uniform(*LA) * (1.0 + LA_PER_SICK * sick)),
        gain_db=float(rng.normal(0.0, 3.0)),
        noise=float(noise * rng.uniform(0.004, 0.015)),
        clutter=float(noise * rng.uniform(0.05, 0.3)),
        lateral_dropout=float(rng.uniform(0.0, 0.7)),
        ecg=ecg,
    )
