"""ECGSYN-style synthetic ECG (McSharry et al. 2003), vectorised, with ground-truth beat events.

ECGSYN moves a point on a limit cycle in (x, y); its angle θ is the cardiac phase (R at
θ = 0) and z obeys

    dz/dt = −Σ_i a_i Δθ_i exp(−Δθ_i² / 2b_i²) − (z − z0(t)),

P, Q, R, S, T being Gaussian events in θ. On the limit cycle θ advances 2π per RR interval,
so the phase is known in closed form per beat and the event angles become event *times*.
We place the events per beat from physiological intervals (PR, QRS width, QT–HR coupling,
`timing.py`), so the ECG's P onset, R and T end are exact ground truth for the heart model.
The driving term of one event integrates to a Gaussian bump of height a·b²/ω; we pick a so
the bump has the wanted amplitude, build Σ bumps G(t) with one vectorised scatter-add, and
integrate the remaining linear part (the −(z − z0) relaxation towards the baseline wander z0)
exactly with a first-order recursive filter. Leads are projections of one dipole per event
type on the standard lead vectors, so 1 to 12 leads cost the same work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from .pacing import PACING_MODES, pacing_signal
from .timing import HR_MAX, HR_MIN, pr_seconds, qrs_onset_offset, qt_seconds

LEAD_NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")

# Event types: normal P, Q, R, S, T, then the ectopic ventricular beat's QRS, S and T.
EVENTS = ("P", "Q", "R", "S", "T", "VR", "VS", "VT")
BEAT_KINDS = ("N", "V")  # normal sinus beat, premature ventricular contraction
# Widest ectopic or paced QRS (s): wider than ~240 ms is exceptional even in a failing
# ventricle; doubling a 0.18 s bundle-branch QRS would give 0.39 s, most of the QT.
WIDE_QRS_MAX = 0.24


def _lead_vectors() -> np.ndarray:
    """Unit-ish lead vectors (x: patient left, y: inferior, z: anterior), shape (12, 3)."""
    frontal = np.deg2rad([0.0, 60.0, 120.0, -150.0, -30.0, 90.0])  # I, II, III, aVR, aVL, aVF
    limb = np.stack([np.cos(frontal), np.sin(frontal), np.zeros(6)], axis=1)
    # Precordial leads sit in the horizontal plane from right-anterior (V1) to left-lateral
    # (V6); they are closer to the heart, hence larger.
    horiz = np.deg2rad([115.0, 95.0, 75.0, 55.0, 30.0, 5.0])
    chest = 1.3 * np.stack([np.cos(horiz), np.full(6, 0.25), np.sin(horiz)], axis=1)
    return np.concatenate([limb, chest]).astype(np.float64)


@dataclass
class EcgMorphology:
    """One subject's ECG: wave sizes, widths, electrical axis, rhythm variability and noise."""

    amp_p: float = 0.15        # mV, dipole magnitudes
    amp_q: float = 0.12
    amp_r: float = 1.4
    amp_s: float = 0.35
    amp_t: float = 0.35
    axis_deg: float = 50.0     # frontal QRS axis; kept in 0..70 so lead I always has an upright R
    t_axis_deg: float = 40.0
    qrs: float = 0.09          # s, QRS duration
    pr: float = 0.16           # s, PR interval at 70 bpm
    p_width: float = 0.022     # s, Gaussian σ of the P wave
    hrv_std: float = 0.03      # s, RR standard deviation at 60 bpm (scaled with RR)
    lf_hf: float = 0.5         # LF/HF power ratio of the RR modulation
    resp_hz: float = 0.25      # respiration: HF peak of HRV, amplitude modulation, baseline wander
    white: float = 0.01        # mV, noise levels
    emg: float = 0.01
    wander: float = 0.08
    powerline: float = 0.01
    mains_hz: float = 50.0
    pvc_rate: float = 0.0      # share of beats that are premature ventricular (no couplets: at most 4/9)
    #                            (not where it would start before the previous T end)
    pacing: str = "none"       # "ventricular": every sinus beat paced from the RV apex (wide QRS
    #                            after a spike); "dual": an atrial spike before each P too
    spike_mv: float = 4.0      # pacing pulse height on a unit lead vector, mV
    spike_ms: float = 0.5      # pacing pulse width
    spike_tail_ms: float = 12.0  # time constant of the afterpotential that follows each pulse

    @classmethod
    def sample(cls, rng: np.random.Generator, qrs: float | None = None, noise: float = 1.0) -> "EcgMorphology":
        """A plausible random subject; `noise` scales every noise source (0 = clean)."""
        return cls(
            amp_p=rng.uniform(0.10, 0.22),
            amp_q=rng.uniform(0.05, 0.2),
            amp_r=rng.uniform(1.1, 2.0),
            amp_s=rng.uniform(0.2, 0.6),
            amp_t=rng.uniform(0.25, 0.5),
            axis_deg=rng.uniform(0.0, 70.0),
            t_axis_deg=rng.uniform(10.0, 60.0),
            qrs=float(qrs) if qrs is not None else rng.uniform(0.08, 0.11),
            pr=rng.uniform(0.13, 0.2),
            p_width=rng.uniform(0.018, 0.026),
            hrv_std=rng.uniform(0.01, 0.05),
            lf_hf=rng.uniform(0.3, 2.0),
            resp_hz=rng.uniform(0.15, 0.35),
            white=noise * rng.uniform(0.003, 0.02),
            emg=noise * rng.uniform(0.0, 0.02),
            wander=noise * rng.uniform(0.02, 0.15),
            powerline=noise * rng.uniform(0.0, 0.02),
            mains_hz=float(rng.choice([50.0, 60.0])),
        )

    def dipoles(self) -> np.ndarray:
        """Event dipoles, shape (8, 3), in mV."""
        ax, tax = np.deg2rad(self.axis_deg), np.deg2rad(self.t_axis_deg)
        r_dir = np.array([np.cos(ax), np.sin(ax), -0.35])
        return np.stack([
            self.amp_p * np.array([0.55, 0.8, 0.15]),
            self.amp_q * np.array([-0.6, 0.2, 0.75]),     # septal activation: left to right
            self.amp_r * r_dir,
            self.amp_s * np.array([-0.45, -0.45, -0.75]),  # terminal forces: right, up, back
            self.amp_t * np.array([np.cos(tax), np.sin(tax), 0.25]),
            -1.3 * self.amp_r * np.array([0.3, -0.8, 0.6]),  # ectopic focus: abnormal axis
            0.5 * self.amp_s * np.array([-0.4, 0.3, -0.5]),
            -1.2 * self.amp_t * np.array([0.3, -0.8, 0.6]),  # discordant T after a PVC
        ])


@dataclass
class BeatEvents:
    """Ground-truth events per beat (seconds, recording time); beats may start before t = 0
    and run past the end so the heart model always has the neighbours it needs."""

    p_on: np.ndarray     # P onset (NaN for ectopic beats, which have no P)
    q_on: np.ndarray     # QRS onset
    r: np.ndarray        # R peak
    t_end: np.ndarray    # T end
    kind: np.ndarray     # 0 = normal ('N'), 1 = premature ventricular ('V')
    paced: np.ndarray | None = None  # True where a pacemaker started the QRS (a wide one); None: none was

    def is_paced(self) -> np.ndarray:
        return np.zeros(len(self.r), dtype=bool) if self.paced is None else self.paced

    def __len__(self) -> int:
        return len(self.r)

    @property
    def rr(self) -> np.ndarray:
        """RR interval that starts at each beat (the last one repeats the previous)."""
        rr = np.diff(self.r)
        return np.append(rr, rr[-1] if len(rr) else 1.0)


@dataclass
class EcgRecord:
    signal: np.ndarray           # float32 (leads, n), mV
    fs: float
    beats: BeatEvents
    lead_names: tuple[str, ...]
    extras: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.signal.shape[1] / self.fs

    @property
    def r_peaks(self) -> np.ndarray:
        """R times (s) that fall inside the recording."""
        r = self.beats.r
        return r[(r >= 0) & (r < self.duration)]

    @property
    def inside(self) -> np.ndarray:
        """Boolean per beat: its R lies inside the recording."""
        return (self.beats.r >= 0) & (self.beats.r < self.duration)


def rr_modulation(t: np.ndarray, morph: EcgMorphology, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-std RR modulation with ECGSYN's bimodal spectrum (LF ~0.1 Hz Mayer
    waves, HF at the respiration rate), as a sum of sinusoids drawn from the two bands."""
    n_comp = 12
    f_lf = rng.normal(0.1, 0.01, n_comp)
    f_hf = rng.normal(morph.resp_hz, 0.01, n_comp)
    freqs = np.concatenate([f_lf, f_hf])
    power = np.concatenate([np.full(n_comp, morph.lf_hf), np.ones(n_comp)]) / n_comp
    phases = rng.uniform(0, 2 * np.pi, 2 * n_comp)
    x = (np.sqrt(2 * power)[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(0)
    return x / np.sqrt(power.sum())


def beat_times(duration: float, hr: float, morph: EcgMorphology, rng: np.random.Generator, pad: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """R times covering [−pad, duration + pad] and each beat's kind (0 normal, 1 PVC)."""
    rr_mean = 60.0 / hr
    t = np.arange(-pad - 3 * rr_mean, duration + pad + 3 * rr_mean, 0.02)
    rr = rr_mean + morph.hrv_std * rr_mean * rr_modulation(t, morph, rng)
    rr = np.clip(rr, 0.8 * rr_mean, 1.2 * rr_mean)
    # Beats where the integrated rate crosses an integer: no per-beat Python loop.
    phase = np.concatenate([[0.0], np.cumsum(0.02 / rr[:-1])]) + rng.uniform(0.0, 1.0)
    r = np.interp(np.arange(np.ceil(phase[0]), np.floor(phase[-1]) + 1), phase, t)
    r = r[(r >= -pad) & (r <= duration + pad)]
    kind = np.zeros(len(r), dtype=np.int8)
    if morph.pvc_rate > 0 and len(r) > 3:
        cand = rng.random(len(r)) < _candidate_rate(morph.pvc_rate)
        cand[:2] = cand[-2:] = False
        cand &= _position_in_run(cand) % 2 == 0  # no couplets: a PVC is followed by a sinus beat
        idx = np.flatnonzero(cand)
        coupling = rng.uniform(0.55, 0.7, len(idx))
        # Premature by the coupling interval; the next sinus beat keeps its time, which
        # gives the full compensatory pause.
        r_pvc = r[idx - 1] + coupling * (r[idx] - r[idx - 1])
        ok = _after_repolarisation(r[idx - 1], r_pvc, morph)
        r[idx[ok]] = r_pvc[ok]
        kind[idx[ok]] = 1
    return r, kind


CANDIDATE_RATE_MAX = 0.8  # PVC candidates: 4 PVCs in 9 beats at most, and runs of sinus beats still occur


def _candidate_rate(pvc_rate: float) -> float:
    """The chance of a beat being drawn as a PVC candidate for `pvc_rate` PVCs among all
    beats: with every other candidate of a run kept (no couplets), candidates at rate q
    give q / (1 + q) PVCs, so q = p / (1 − p). Capped below strict bigeminy, which would
    leave no sinus beat between sinus neighbours (a beat-locked clip needs one)."""
    return min(pvc_rate / (1.0 - pvc_rate), CANDIDATE_RATE_MAX) if pvc_rate < 1.0 else CANDIDATE_RATE_MAX


def _position_in_run(flags: np.ndarray) -> np.ndarray:
    """For each True, its place in its run of consecutive Trues (0 for the first)."""
    n = np.arange(len(flags))
    last_false = np.maximum.accumulate(np.where(flags, -1, n))
    return n - last_false - 1


def _after_repolarisation(r_prev: np.ndarray, r_pvc: np.ndarray, morph: EcgMorphology) -> np.ndarray:
    """True where a PVC at `r_pvc` starts its QRS after the preceding sinus beat's T end.
    At fast rates a coupling interval drawn as a fraction of RR can fall inside the
    previous QRS, while the ventricle is refractory: no premature beat happens there."""
    sinus, ectopic = np.zeros(len(r_prev), dtype=np.int8), np.ones(len(r_prev), dtype=np.int8)
    paced = np.full(len(r_prev), morph.pacing != "none")   # as `beat_events` will have it
    q_prev = r_prev - qrs_onset_offset(_qrs_widths(sinus, paced, morph))
    t_end_prev = _t_end(q_prev, r_pvc - r_prev, sinus, paced)  # a sinus beat's QT follows its own RR
    q_pvc = r_pvc - qrs_onset_offset(_qrs_widths(ectopic, np.zeros_like(paced), morph))
    return q_pvc >= t_end_prev


def _t_end(q_on: np.ndarray, rr: np.ndarray, kind: np.ndarray, paced: np.ndarray) -> np.ndarray:
    """T end from QRS onset: the rate's QT, a little longer after a wide (ectopic or paced) QRS."""
    return q_on + qt_seconds(rr) + np.where(kind == 1, 0.04, np.where(paced, 0.03, 0.0))


def beat_events(r: np.ndarray, kind: np.ndarray, morph: EcgMorphology) -> BeatEvents:
    """Per-beat ground-truth events from R times, using the QT–HR and PR–HR relations."""
    rr_next = np.append(np.diff(r), np.diff(r)[-1] if len(r) > 1 else 1.0)
    rr_prev = np.insert(np.diff(r), 0, rr_next[0])
    # A sinus beat's intervals follow its own cycle; a PVC's QT follows the sinus rate.
    rr = np.where(kind == 1, rr_prev / 0.62, rr_next)
    paced = (kind == 0) & (morph.pacing != "none")
    qrs = _qrs_widths(kind, paced, morph)
    q_on = r - qrs_onset_offset(qrs)
    # A paced beat's AV delay is the pacemaker's: programmed a little shorter than the PR.
    pr = np.where(paced, 0.85, 1.0) * pr_seconds(rr, morph.pr)
    p_on = np.where(kind == 1, np.nan, q_on - pr)
    t_end = _t_end(q_on, rr, kind, paced)
    return BeatEvents(p_on=p_on, q_on=q_on, r=r, t_end=t_end, kind=kind, paced=paced if paced.any() else None)


def _qrs_widths(kind: np.ndarray, paced: np.ndarray, morph: EcgMorphology) -> np.ndarray:
    """QRS duration per beat: ectopic and RV-paced activation spreads through muscle, not
    the conduction system, so both are wide (a paced QRS about 150–170 ms), but no wider
    than WIDE_QRS_MAX however wide the subject's own QRS is."""
    wide = np.where(kind == 1, 2.0 * morph.qrs + 0.03, 1.6 * morph.qrs + 0.02)
    return np.where((kind == 1) | paced, np.minimum(wide, WIDE_QRS_MAX), morph.qrs)


def _event_table(ev: BeatEvents, morph: EcgMorphology, resp_mod: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(type, centre s, σ s, amplitude scale) for every Gaussian event of every beat."""
    n = len(ev)
    has_p = ev.kind == 0
    # A paced QRS spreads from the stimulus like an ectopic one: the ectopic waves draw it.
    normal = has_p & ~ev.is_paced()
    qrs = _qrs_widths(ev.kind, ev.is_paced(), morph)
    qt = ev.t_end - ev.q_on
    sig_t = 0.11 * qt
    p_c = ev.p_on + 2.0 * morph.p_width
    rows = [
        (0, p_c, np.full(n, morph.p_width), has_p),
        (1, ev.r - 0.3 * qrs, 0.07 * qrs, normal),
        (2, ev.r, 0.11 * qrs, normal),
        (3, ev.r + 0.32 * qrs, 0.09 * qrs, normal),
        (4, ev.t_end - 2.2 * sig_t, sig_t, normal),
        (5, ev.r, 0.16 * qrs, ~normal),
        (6, ev.r + 0.35 * qrs, 0.1 * qrs, ~normal),
        (7, ev.t_end - 2.2 * sig_t, 1.2 * sig_t, ~normal),
    ]
    kinds = np.concatenate([np.full(n, k)[m] for k, _, _, m in rows])
    centre = np.concatenate([c[m] for _, c, _, m in rows])
    sigma = np.concatenate([np.broadcast_to(s, (n,))[m] for _, _, s, m in rows])
    scale = np.concatenate([resp_mod[m] for _, _, _, m in rows])
    return kinds, centre, sigma, scale


def _gaussian_sum(n: int, fs: float, kinds: np.ndarray, centre: np.ndarray, sigma: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Σ of unit Gaussian bumps per event type, shape (8, n): one scatter-add, no beat loop."""
    half = int(np.ceil(4.5 * sigma.max() * fs)) + 1
    offs = np.arange(-half, half + 1)
    c_idx = np.round(centre * fs).astype(np.int64)
    idx = c_idx[:, None] + offs[None, :]                       # (events, window)
    dt = idx / fs - centre[:, None]
    vals = scale[:, None] * np.exp(-0.5 * (dt / sigma[:, None]) ** 2)
    ok = (idx >= 0) & (idx < n)
    flat = (kinds[:, None] * n + idx)[ok]
    return np.bincount(flat, weights=vals[ok], minlength=len(EVENTS) * n).reshape(len(EVENTS), n)


def _noise(leads: int, n: int, fs: float, t: np.ndarray, morph: EcgMorphology, rng: np.random.Generator) -> np.ndarray:
    """White + EMG (band-limited, bursty) + powerline noise, shape (leads, n), mV."""
    out = morph.white * rng.standard_normal((leads, n))
    if morph.emg > 0:
        raw = rng.standard_normal((leads, n + 2))
        hp = raw[:, 2:] - raw[:, :-2]                         # emphasises > 20 Hz muscle noise
        burst = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 6.3)) ** 2
        out += morph.emg * hp * burst
    if morph.powerline > 0:
        out += morph.powerline * np.sin(2 * np.pi * morph.mains_hz * t + rng.uniform(0, 2 * np.pi, (leads, 1)))
    return out


def _check_arguments(duration: float, fs: float, hr: float, leads: int, noise: float) -> None:
    """Clear errors for what would otherwise fail deep in NumPy or give a NaN signal."""
    if not HR_MIN <= hr <= HR_MAX:
        raise ValueError(f"hr must be within {HR_MIN:g}..{HR_MAX:g} bpm, got {hr}")
    if not (1 <= leads <= 12 and int(leads) == leads):
        raise ValueError(f"leads must be a whole number 1..12, got {leads}")
    for name, value in (("duration", duration), ("fs", fs)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    if int(round(duration * fs)) < 1:
        raise ValueError(f"duration {duration} s at fs {fs} Hz is less than one sample")
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be 0 or more, got {noise}")


def simulate_ecg(
    duration: float,
    fs: float = 250.0,
    hr: float = 70.0,
    leads: int = 1,
    seed: int | np.random.Generator | None = None,
    morph: EcgMorphology | None = None,
    noise: float = 1.0,
    pvc_rate: float | None = None,
    pacing: str | None = None,
) -> EcgRecord:
    """Simulate `duration` seconds of ECG at `fs` Hz and mean heart rate `hr` (30..200 bpm).

    Returns an `EcgRecord`: signal float32 (leads, n) in mV (standard lead order I, II, III,
    aVR, aVL, aVF, V1..V6; the first `leads`), per-beat ground truth events and R times.
    `morph` fixes the subject (else one is drawn from the seed); `noise` scales the noise of
    a drawn subject; `pvc_rate` overrides the chance of premature ventricular beats;
    `pacing` ("none", "ventricular", "dual") makes the subject paced: its stimulus times
    are in `extras["pacing_spikes"]` ({"atrial": s, "ventricular": s}).
    """
    _check_arguments(duration, fs, hr, leads, noise)
    leads = int(leads)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    morph = morph if morph is not None else EcgMorphology.sample(rng, noise=noise)
    if pvc_rate is not None:
        morph = dataclasses.replace(morph, pvc_rate=float(pvc_rate))
    if pacing is not None:
        morph = dataclasses.replace(morph, pacing=pacing)
    if morph.pacing not in PACING_MODES:
        raise ValueError(f"pacing must be one of {', '.join(PACING_MODES)}, got {morph.pacing!r}")
    if not 0.0 <= morph.pvc_rate <= 1.0:  # NaN fails too
        raise ValueError(f"pvc_rate must be within 0..1, got {morph.pvc_rate}")

    r, kind = beat_times(duration, hr, morph, rng)
    ev = beat_events(r, kind, morph)
    n = int(round(duration * fs))
    t = np.arange(n) / fs

    # Respiration modulates the electrical axis / amplitude by a few percent per beat.
    resp_phase = rng.uniform(0, 2 * np.pi)
    resp_mod = 1.0 + 0.06 * np.sin(2 * np.pi * morph.resp_hz * ev.r + resp_phase)
    g = _gaussian_sum(n, fs, *_event_table(ev, morph, resp_mod))
    proj = _lead_vectors()[:leads] @ morph.dipoles().T        # (leads, 8) mV per unit bump
    bumps = np.einsum("le,en->ln", proj, g)                   # (leads, n); no BLAS threads

    # Baseline wander z0: respiration plus a slow random drift (the ECGSYN z0 term).
    z0 = morph.wander * (np.sin(2 * np.pi * morph.resp_hz * t + resp_phase)
                         + 0.5 * np.sin(2 * np.pi * rng.uniform(0.03, 0.1) * t + rng.uniform(0, 6.3)))
    # z = G + y with dy/dt = −y + (z0 − G): exact first-order relaxation, one IIR pass.
    decay = np.exp(-1.0 / fs)
    drive = z0[None, :] - bumps
    y0 = drive.mean(axis=1, keepdims=True)  # start near steady state
    y, _ = lfilter([1.0 - decay], [1.0, -decay], drive, axis=-1, zi=decay * y0)
    sig = bumps + y + _noise(leads, n, fs, t, morph, rng)
    extras = {"hr": float(hr), "morph": morph}
    if morph.pacing != "none":
        # The ventricular stimulus starts the paced QRS; the atrial one (dual) starts the P wave.
        spikes = {"ventricular": ev.q_on[ev.is_paced()],
                  "atrial": ev.p_on[ev.is_paced()] if morph.pacing == "dual" else np.empty(0)}
        sig = sig + pacing_signal(_lead_vectors()[:leads], n, fs, spikes["atrial"], spikes["ventricular"],
                                  morph.spike_mv, morph.spike_ms / 1000.0, morph.spike_tail_ms / 1000.0)
        extras["pacing_spikes"] = {k: v[(v >= 0) & (v < n / fs)] for k, v in spikes.items()}
    return EcgRecord(
        signal=sig.astype(np.float32),
        fs=float(fs),
        beats=ev,
        lead_names=LEAD_NAMES[:leads],
        extras=extras,
    )
