"""Paired ECG + echocardiography simulator with ground truth (DESIGN §4).

    simulate_ecg      ECGSYN-style ECG, 1–12 leads, HRV, QT–HR coupling, noise, PVCs
    sample_subject    one patient: EF, volumes, anatomy, ECG morphology, image quality
    HeartCycle        LV volume driven by the ECG's beat events
    EchoRenderer      apical A4C/A2C B-mode with moving speckle, LV masks
    simulate_pair     one paired sample (beat-locked or fixed frame rate)
    iter_pairs        a stream of samples from a process pool
    BeatDrivenEcho    renders beats from R times alone (the streaming engine's `sim` backend)
"""
from .beat_driven import BeatDrivenEcho
from .ecg import BeatEvents, EcgMorphology, EcgRecord, simulate_ecg
from .echo import EchoRenderer
from .heart import HeartCycle
from .measure import disc_volume, disc_volumes, ejection_fraction
from .paired import beat_locked_times, iter_pairs, simulate_pair
from .subject import Subject, sample_subject

__all__ = [
    "BeatDrivenEcho",
    "BeatEvents",
    "EcgMorphology",
    "EcgRecord",
    "EchoRenderer",
    "HeartCycle",
    "Subject",
    "beat_locked_times",
    "disc_volume",
    "disc_volumes",
    "ejection_fraction",
    "iter_pairs",
    "sample_subject",
    "simulate_ecg",
    "simulate_pair",
]
