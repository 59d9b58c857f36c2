"""Streaming: ring buffers, beat segmentation, the asyncio engine, the ZeroMQ protocol, the CLI.

`echopulse.stream.Engine` and friends are loaded on first use, so importing the CLI stays
light (no numba or torch until a command needs them).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "engine",
    "EngineLimits": "session",
    "Publisher": "publish",
    "Subscriber": "subscribe",
    "AsyncSubscriber": "subscribe",
    "BeatSegmenter": "beats",
    "make_backend": "backends",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
