"""Apical-view heart geometry and its motion: reference shapes plus an inverse deformation.

Coordinates (cm): the image has x to the viewer's right and y down from the probe. The heart
frame turns that by the tilt: `a` runs along the LV long axis away from the probe, `v` across
it (positive towards the LV lateral wall, i.e. the viewer's right; the LV axis is v = 0).

Shapes are defined once, at end-diastole, in this frame ("material" coordinates). Motion is
a map from where a point is now back to where it was at end-diastole, so anything fixed to
tissue (labels, scatterers) is sampled through it. The map is separable: along the axis the
apex stays put and the valve plane moves (ventricles shorten, atria stretch), across it the
walls move piecewise-linearly between knots (cavity, septum, RV, far field). Inside the LV
cavity both pieces are plain scalings, so the cavity stays the reference shape scaled by
(L(t)/L0, W(t)/W0) and its method-of-discs volume tracks the heart model's volume exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .subject import Subject

log = logging.getLogger(__name__)

LONG_AXIS_EXPONENT = 0.22  # L ∝ V^0.22: ~15 % long-axis shortening at EF 60 %, little at EF 20 %
FAR = 14.0                 # cm from the LV axis where lateral motion has died out


def _lv_profile_exact(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.sqrt(1.0 - x ** 2.4) * (1.0 - 0.22 * np.exp(-(x / 0.2) ** 2))


_LUT_X = np.linspace(0.0, 1.0, 4097)
_LUT = _lv_profile_exact(_LUT_X)


def lv_profile(x: np.ndarray) -> np.ndarray:
    """LV cavity half-width / W at fraction x of the length from base (0) to apex (1):
    a bullet (fuller than a half-ellipse), narrowed towards the mitral annulus as real
    ventricles are. Tabulated: it is evaluated on whole image grids every frame."""
    return np.interp(x, _LUT_X, _LUT)


_XS = (np.arange(20000) + 0.5) / 20000
PROFILE_AREA = float(np.mean(_lv_profile_exact(_XS) ** 2))  # V = π W² L · PROFILE_AREA


@dataclass
class FrameState:
    """Per-frame geometry (arrays of shape (T,))."""

    base: np.ndarray      # axial position of the mitral annulus
    w: np.ndarray         # LV cavity half-width scale W(t)
    th: np.ndarray        # lateral wall thickness
    ts: np.ndarray        # septal thickness
    w_rv: np.ndarray      # RV cavity width scale
    th_rv: np.ndarray     # RV free wall thickness
    lam: np.ndarray       # axial scale of the ventricles, L(t)/L0


class Anatomy:
    """One subject's heart in the apical view (A4C or A2C)."""

    def __init__(self, subject: Subject) -> None:
        s = subject
        self.subject = s
        self.a4c = s.view == "a4c"
        q = s.sphericity
        self.L0 = (s.edv / (np.pi * q * q * PROFILE_AREA)) ** (1.0 / 3.0)
        self.W0 = q * self.L0
        self.th0 = s.wall
        self.ts0 = 1.08 * s.wall
        self.th_apex = 0.7 * s.wall
        self.d = s.apex_depth                         # epicardial apex, fixed in time
        self.base0 = self.d + self.th_apex + self.L0  # mitral annulus at ED
        self.w_rv0 = s.rv_scale * self.W0 if self.a4c else 0.0
        self.th_rv0 = 0.38 if self.a4c else 0.0
        self.base_rv0 = self.base0 - 0.5               # tricuspid annulus sits more apically
        la_w = s.la_scale * 0.95 * self.W0
        la_h = s.la_scale * 2.5
        self.la = (self.base0 + 0.55 * la_h, (0.25 * self.W0 if self.a4c else 0.0), la_h, la_w)
        ra_w = 0.9 * la_w
        self.ra = (self.base_rv0 + 0.55 * la_h, -(self.W0 + 0.55 * self.ts0) - 0.25 - ra_w, 0.95 * la_h, ra_w)
        self.bottom = max(self.la[0] + self.la[2], self.ra[0] + self.ra[2]) + 0.5
        # The LV axis runs from the probe (the apex sits under it); the tilt swings the base
        # to the right in A4C so the RV fits on the left. `fit_sector` may turn it further.
        tilt = np.deg2rad(s.tilt_deg)
        self.sin_t, self.cos_t = float(np.sin(tilt)), float(np.cos(tilt))

    def fit_sector(self, half_angle: float, margin: float = np.deg2rad(2.0)) -> None:
        """Turn the heart about the probe, as a sonographer would, until the LV cavity (and
        the inner part of its walls) lies inside the sector, so its mask is never cut."""
        x_c = np.linspace(0.0, 1.0, 40)
        a = self.base0 - x_c * self.L0
        half_w = self.W0 * lv_profile(x_c) + 0.4
        limit = half_angle - margin
        for _ in range(8):
            right = np.arctan2(*self.from_heart(a, half_w)).max() - limit
            left = -limit - np.arctan2(*self.from_heart(a, -half_w)).min()
            turn = max(right, 0.0) - max(left, 0.0)
            if abs(turn) < 1e-4:
                break
            tilt = np.arctan2(self.sin_t, self.cos_t) - turn
            self.sin_t, self.cos_t = float(np.sin(tilt)), float(np.cos(tilt))
        log.debug("LV axis at %.1f deg in a %.0f deg sector", np.degrees(np.arctan2(self.sin_t, self.cos_t)), np.degrees(2 * half_angle))

    # -- frames -----------------------------------------------------------------------------

    def to_heart(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (x right, y down; cm from the probe) to heart frame (a, v)."""
        return x * self.sin_t + y * self.cos_t, x * self.cos_t - y * self.sin_t

    def from_heart(self, a: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Heart frame (a, v) back to image coordinates (x, y)."""
        return a * self.sin_t + v * self.cos_t, a * self.cos_t - v * self.sin_t

    def to_heart_dir(self, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A direction in the image as components along (a, v)."""
        return dx * self.sin_t + dy * self.cos_t, dx * self.cos_t - dy * self.sin_t

    def state(self, volume: np.ndarray) -> FrameState:
        """Geometry for LV volumes (ml): shorten with V^0.22, the rest by widening; walls
        thicken so their cross-section is conserved."""
        rel = np.asarray(volume, dtype=np.float64) / self.subject.edv
        lam = rel ** LONG_AXIS_EXPONENT
        w = self.W0 * np.sqrt(rel / lam)
        base = self.d + (self.base0 - self.d) * lam

        def thick(w_now: np.ndarray, w_ref: float, t_ref: float) -> np.ndarray:
            return np.sqrt(w_now ** 2 + 2.0 * w_ref * t_ref + t_ref ** 2) - w_now

        w_rv = self.w_rv0 * (w / self.W0) ** 0.7
        th_rv = thick(w_rv, self.w_rv0, self.th_rv0) if self.a4c else np.zeros_like(w)
        return FrameState(base=base, w=w, th=thick(w, self.W0, self.th0), ts=thick(w, self.W0, self.ts0),
                          w_rv=w_rv, th_rv=th_rv, lam=lam)

    def _lateral_knots(self, st: FrameState, i: int) -> tuple[np.ndarray, np.ndarray]:
        now = [st.w[i], st.w[i] + st.th[i]]
        ref = [self.W0, self.W0 + self.th0]
        if self.a4c:
            left_now = [-(st.w[i] + st.ts[i] + 2 * st.w_rv[i] + st.th_rv[i]), -(st.w[i] + st.ts[i]), -st.w[i]]
            left_ref = [-(self.W0 + self.ts0 + 2 * self.w_rv0 + self.th_rv0), -(self.W0 + self.ts0), -self.W0]
        else:
            left_now = [-(st.w[i] + st.th[i]), -st.w[i]]
            left_ref = [-(self.W0 + self.th0), -self.W0]
        return np.array([-FAR, *left_now, *now, FAR]), np.array([-FAR, *left_ref, *ref, FAR])

    def inverse(self, a: np.ndarray, v: np.ndarray, st: FrameState, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the tissue now at (a, v) was at end-diastole, for frame i of `st`."""
        d, b0, b = self.d, self.base0, st.base[i]
        bot = self.bottom
        a_ref = np.where(a <= d, a, d + (a - d) * ((b0 - d) / (b - d)))
        a_ref = np.where(a > b, b0 + (a - b) * ((bot - b0) / (bot - b)), a_ref)
        a_ref = np.where(a > bot, a, a_ref)
        now, ref = self._lateral_knots(st, i)
        v_lat = np.interp(v, now, ref, left=None, right=None)
        v_lat = np.where(np.abs(v) >= FAR, v, v_lat)
        # Below the valve plane the annulus drags the atria only partly; the chest wall above
        # the apex does not move with the heart at all.
        w = np.clip(1.0 - (a_ref - b0) / 2.5, 0.35, 1.0) * np.clip((a_ref - (d - 1.2)) / 1.0, 0.0, 1.0)
        return a_ref, v + w * (v_lat - v)

    # -- ground truth --------------------------------------------------------------------------

    def lv_cavity_now(self, a: np.ndarray, v: np.ndarray, st: FrameState) -> np.ndarray:
        """LV cavity membership at (a, v) for every frame: bool (T, *a.shape). Exact shape:
        the reference cavity scaled by the frame's length and width."""
        lam = st.lam.reshape((-1,) + (1,) * a.ndim)
        base = st.base.reshape(lam.shape)
        w = st.w.reshape(lam.shape)
        length = self.L0 * lam
        x = (base - a) / length                      # 0 at the annulus, 1 at the apex
        return (x >= 0) & (x <= 1) & (np.abs(v) <= w * lv_profile(x))

    # -- reference tissue ------------------------------------------------------------------

    def labels(self, a: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean regions of the reference (end-diastolic) heart at material points."""
        L0, W0 = self.L0, self.W0
        b0 = self.base0
        x_c = (b0 - a) / L0
        lv = (x_c >= 0) & (x_c <= 1) & (np.abs(v) <= W0 * lv_profile(x_c))
        le = L0 + self.th_apex
        x_e = (b0 - a) / le
        w_epi = np.where(v < 0, W0 + self.ts0, W0 + self.th0)
        lv_epi = (x_e >= 0) & (x_e <= 1) & (np.abs(v) <= w_epi * lv_profile(x_e) + 0.15 * np.exp(-(x_e / 0.2) ** 2))
        out = {"lv": lv, "lv_epi": lv_epi}
        if self.a4c:
            wl = W0 + self.ts0 + 2 * self.w_rv0 + self.th_rv0
            rv_outer = (v < 0) & (x_e >= 0) & (x_e <= 1) & (-v <= wl * np.sqrt(np.clip(1 - x_e ** 2, 0, 1)))
            x_r = (b0 - a) / (0.8 * le)
            rv_inner = (v < 0) & (x_r <= 1) & (-v <= (wl - self.th_rv0) * np.sqrt(np.clip(1 - x_r ** 2, 0, 1)))
            rv = rv_inner & ~lv_epi & (a < self.base_rv0)
            out["rv"] = rv
            out["heart"] = lv_epi | rv_outer
        else:
            out["heart"] = lv_epi
        out["la"] = self._ellipse(a, v, self.la) & (a > b0 + 0.1)
        out["la_wall"] = self._ellipse(a, v, self.la, grow=0.28) & (a > b0 - 0.1)
        if self.a4c:
            out["ra"] = self._ellipse(a, v, self.ra) & (a > self.base_rv0 + 0.1) & ~out["la_wall"]
            out["ra_wall"] = self._ellipse(a, v, self.ra, grow=0.25) & (a > self.base_rv0 - 0.1)
        return out

    @staticmethod
    def _ellipse(a: np.ndarray, v: np.ndarray, e: tuple[float, float, float, float], grow: float = 0.0) -> np.ndarray:
        ac, vc, ha, wv = e
        return ((a - ac) / (ha + grow)) ** 2 + ((v - vc) / (wv + grow)) ** 2 <= 1.0

    def valve_segments(self, st: FrameState, opening: np.ndarray) -> np.ndarray:
        """Leaflets as segments in the current heart frame: (T, n, 2 points, (a, v))."""
        segs = []
        for i in range(len(st.base)):
            ang = np.deg2rad(12.0 + 70.0 * opening[i])   # from the annulus plane towards the apex
            b, w = st.base[i], st.w[i] * lv_profile(np.zeros(1))[0]
            span = 2 * w
            hinge_s, hinge_l = np.array([b, -w]), np.array([b, w])
            one = [
                (hinge_s, hinge_s + 0.6 * span * np.array([-np.sin(ang), np.cos(ang)])),
                (hinge_l, hinge_l + 0.45 * span * np.array([-np.sin(ang), -np.cos(ang)])),
            ]
            if self.a4c:
                tb = self.d + (self.base_rv0 - self.d) * st.lam[i]
                sep = -(st.w[i] + st.ts[i])
                free = sep - 2 * st.w_rv[i]
                rspan = sep - free
                h1, h2 = np.array([tb, sep]), np.array([tb, free])
                one += [
                    (h1, h1 + 0.5 * rspan * np.array([-np.sin(ang), -np.cos(ang)])),
                    (h2, h2 + 0.5 * rspan * np.array([-np.sin(ang), np.cos(ang)])),
                ]
            segs.append(np.array([[p, q] for p, q in one]))
        return np.array(segs)
