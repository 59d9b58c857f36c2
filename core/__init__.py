"""Models, sampler, training, evaluation and the paired ECG + echo simulator.

`echopulse.core.Generator` (and the presets) load on first use, so `import echopulse.core`
does not import torch by itself.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Generator": "generator",
    "Preset": "config",
    "preset": "config",
    "simulate_pair": "simulate",
    "simulate_ecg": "simulate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
