"""The demo: ECG through the real engine, publisher and subscriber, into files a person opens.

    result = asyncio.run(run_demo(DemoOptions(out=Path("echopulse-demo"))))

A synthetic ECG (or a recording) streams through `Engine` at a set speed; a
ZeroMQ `Publisher` on a free loopback port sends the frames and an `AsyncSubscriber`
collects them, exactly as a viewer would. The raw ECG comes back from the engine's data
directory, so the pictures show what the engine received, not what we meant to send.
"""
from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import media
from .protocol import FrameMessage, StatusMessage

log = logging.getLogger(__name__)

ECHO_SIDE = 256        # pixels of the echo in the MP4 and plots
VIDEO_FPS = 30.0       # the MP4 plays in ECG time at this rate
TRACE_BEFORE_S = 2.5   # ECG shown left of the cursor in the MP4
TRACE_AFTER_S = 0.5


@dataclass
class DemoOptions:
    out: Path = Path("echopulse-demo")
    seconds: float | None = None   # ECG seconds to stream (None: 20 synthetic, a recording whole)
    speed: float = 2.0             # ECG seconds per wall second (0: as fast as possible)
    hr: float = 72.0
    seed: int = 0
    backend: str | None = None     # None: the default (the shipped model, else sim)
    file: Path | None = None       # a recording instead of the synthetic ECG
    fs: float | None = None        # for a recording that does not say its rate
    lead: int | None = None
    reference: str | None = None   # the patient's echo loop (model backend), as `serve --reference`
    progress: bool = True


@dataclass
class DemoResult:
    device: str
    frames: list[FrameMessage]
    statuses: list[StatusMessage]
    ecg: np.ndarray                # leads × n, mV, as the engine persisted it
    ecg_fs: float
    ecg_t0: float
    counters: dict[str, Any]
    wall_s: float
    files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _device(options: DemoOptions) -> str:
    """The id the demo's one device streams under."""
    return "recording" if options.file is not None else "demo-0"


SYNTHETIC_SECONDS = 20.0  # the synthetic ECG's length when --seconds is not given


def _source(options: DemoOptions, recording: Any = None) -> Any:
    realtime: float | bool = options.speed if options.speed > 0 else False
    if options.file is not None:
        from ..bridges.replay import FileSource

        source = FileSource(options.file, fs=options.fs, lead=options.lead, device=_device(options), realtime=realtime)
        source.recording = recording  # read once, already cut to --seconds
        return source
    from ..bridges.synthetic import SyntheticSource

    return SyntheticSource(devices=1, hr=options.hr, seed=options.seed, realtime=realtime,
                           duration_s=options.seconds or SYNTHETIC_SECONDS, prefix="demo")


def _fresh_data_dir(options: DemoOptions) -> Path:
    """The engine's raw-ECG folder under --out, without an earlier demo's ECG of the same
    device: the engine appends to a device's store, and the pictures would show both runs."""
    import shutil

    from .datadir import device_dirname

    data_dir = options.out / "data"
    shutil.rmtree(data_dir / device_dirname(_device(options)), ignore_errors=True)
    return data_dir


async def stream(options: DemoOptions) -> DemoResult:
    """Run engine → publisher → subscriber once; return what the subscriber received."""
    from ..bridges.replay import read_recording
    from .backends import make_backend
    from .datadir import list_devices, read_chunks
    from .engine import Engine
    from .publish import Publisher
    from .session import EngineLimits
    from .subscribe import AsyncSubscriber

    seconds, recording = options.seconds or SYNTHETIC_SECONDS, None
    if options.file is not None:
        # Fail before anything starts, with the reader's own one-line message.
        recording = read_recording(options.file, fs=options.fs, lead=options.lead)
        if options.seconds is not None:  # a day-long Holter file need not stream whole
            recording = recording._replace(samples=recording.samples[:, : int(round(options.seconds * recording.fs))])
        seconds = recording.samples.shape[1] / recording.fs
    # The demo is a bounded run that should show every beat: the beat queue holds all of
    # them (200 bpm at most), where a live daemon would drop the oldest under overload.
    limits = EngineLimits(beat_queue=int(seconds * 200 / 60) + 4, drain_timeout_s=300.0)
    data_dir = _fresh_data_dir(options)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    backend = make_backend(options.backend, references={_device(options): options.reference} if options.reference else None)
    frames: list[FrameMessage] = []
    statuses: list[StatusMessage] = []
    bar = _progress(options)
    t_start = time.perf_counter()
    with Publisher(endpoint) as publisher:
        async with AsyncSubscriber(endpoint) as subscriber:
            engine = Engine([_source(options, recording)], backend, publisher, data_dir, limits=limits)
            run = asyncio.create_task(engine.run())
            while True:
                msg = await subscriber.recv(timeout=0.25)
                if isinstance(msg, FrameMessage):
                    frames.append(msg)
                    if bar is not None and msg.header["t"] > bar.n:
                        bar.update(msg.header["t"] - bar.n)
                elif isinstance(msg, StatusMessage):
                    statuses.append(msg)
                elif run.done():
                    break  # engine finished and the socket has gone quiet
            await run  # re-raises an engine failure
            counters = engine.counters()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start

    device = _device(options)
    if device not in list_devices(data_dir):
        raise RuntimeError("the engine received no ECG")
    chunks = list(read_chunks(data_dir, device))
    ecg = np.concatenate([c.samples for c in chunks], axis=1)
    fs, t0 = float(chunks[0].entry["fs"]), float(chunks[0].entry["t0"])
    mine = sorted((f for f in frames if f.device == device), key=lambda f: f.seq)
    return DemoResult(device, mine, statuses, ecg, fs, t0, counters.get(device, {}), wall)


def _progress(options: DemoOptions) -> Any:
    if not options.progress:
        return None
    from tqdm import tqdm

    total = options.seconds or (SYNTHETIC_SECONDS if options.file is None else None)
    return tqdm(total=total, unit="s ECG", desc="streaming", bar_format="{desc}: {n:.1f}/{total} {unit} [{elapsed}]" if total else None)


# -- outputs ------------------------------------------------------------------------------


def lv_areas(frames: np.ndarray) -> np.ndarray | None:
    """LV area (pixels) per frame from the shipped segmenter, or None when none ships."""
    from ..core.generator import DEFAULT_WEIGHTS
    from ..core.lv_segmenter import load_segmenter

    try:
        segmenter = load_segmenter(DEFAULT_WEIGHTS)
    except FileNotFoundError:
        return None
    masks = segmenter.masks(frames)
    return masks.reshape(len(masks), -1).sum(axis=1).astype(np.float64)


def write_outputs(result: DemoResult, out: Path) -> dict[str, str]:
    """MP4, contact sheet, LV-area curve and latency summary under `out`; returns the paths."""
    frames = np.stack([f.pixels for f in result.frames])
    t = np.array([f.header["t"] for f in result.frames])
    r_peaks = np.unique([f.header["r_time"] for f in result.frames])
    lead = result.ecg[0]
    files = {
        "video": str(out / "demo.mp4"),
        "contact_sheet": str(out / "contact_sheet.png"),
        "lv_area": str(out / "lv_area.png"),
        "summary": str(out / "summary.json"),
    }
    media.write_mp4(files["video"], _movie(frames, t, result, r_peaks), VIDEO_FPS)
    media.save_png(files["contact_sheet"], _contact_sheet(result, lead, r_peaks))
    areas = lv_areas(frames)
    media.save_png(files["lv_area"], _area_plot(t, areas, lead, result, r_peaks))
    result.summary = summarise(result, areas is not None)
    Path(files["summary"]).write_text(json.dumps(result.summary, indent=2) + "\n")
    result.files = files
    return files


def _movie(frames: np.ndarray, t: np.ndarray, result: DemoResult, r_peaks: np.ndarray) -> Any:
    """Frames at VIDEO_FPS in ECG time: each shows the newest echo frame at or before it."""
    clock = np.arange(t[0], t[-1], 1.0 / VIDEO_FPS)
    which = np.searchsorted(t, clock, side="right") - 1
    for now, i in zip(clock, which):
        header = result.frames[i].header
        echo = media.label(media.gray_to_rgb(frames[i], ECHO_SIDE), f"{result.device}  beat {header['beat']}  {header['hr']:.0f} bpm")
        strip = media.ecg_strip(result.ecg[0], result.ecg_fs, now - TRACE_BEFORE_S, now + TRACE_AFTER_S, ECHO_SIDE,
                                ecg_t0=result.ecg_t0, cursor=now, marks=r_peaks)
        yield np.concatenate([echo, strip], axis=0)


def _contact_sheet(result: DemoResult, lead: np.ndarray, r_peaks: np.ndarray, beats: int = 3, tile: int = 96) -> np.ndarray:
    """One row per beat (its frames left to right) over the ECG of that beat."""
    rows = []
    by_beat: dict[int, list[FrameMessage]] = {}
    for f in result.frames:
        by_beat.setdefault(f.header["beat"], []).append(f)
    for beat in sorted(by_beat)[1 : beats + 1] or sorted(by_beat)[:beats]:
        group = by_beat[beat]
        tiles = [media.label(media.gray_to_rgb(f.pixels, tile), f"{f.header['frame']}") for f in group]
        row = np.concatenate(tiles, axis=1)
        h = group[0].header
        strip = media.ecg_strip(lead, result.ecg_fs, h["r_time"] - 0.5 * h["rr"] / len(group), h["r_time"] + h["rr"] * (1 - 0.5 / len(group)),
                                row.shape[1], height=64, ecg_t0=result.ecg_t0, marks=r_peaks)
        rows.append(media.label(np.concatenate([row, strip], axis=0), f"beat {beat}  {h['hr']:.0f} bpm", xy=(4, tile - 12)))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def _area_plot(t: np.ndarray, areas: np.ndarray | None, lead: np.ndarray, result: DemoResult, r_peaks: np.ndarray) -> np.ndarray:
    t_ecg = result.ecg_t0 + np.arange(lead.size) / result.ecg_fs
    span = (float(t[0]), float(min(t[-1], t[0] + 10.0)))
    ecg_panel = media.line_plot([(t_ecg, lead, media.ECG_GREEN, "ECG (mV)")], t_range=span, marks=r_peaks, title="ECG")
    if areas is None:
        title = "LV area: no segmenter ships with this installation"
        area_panel = media.line_plot([(t, np.zeros_like(t), (90, 90, 90), "")], t_range=span, title=title)
    else:
        area_panel = media.line_plot([(t, areas, (110, 170, 255), "LV area (pixels, segmented)")], t_range=span, marks=r_peaks,
                                     title="generated echo")
    return np.concatenate([area_panel, ecg_panel], axis=0)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * 1000.0
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "max_ms": float(arr.max())}


def summarise(result: DemoResult, has_areas: bool) -> dict[str, Any]:
    """Counts and latencies of the run, as `summary.json` holds them."""
    headers = [f.header for f in result.frames]
    beats = sorted({h["beat"] for h in headers})
    # A beat's latency: from the ECG that completed it arriving to its last frame sent.
    last_frame = {h["beat"]: h for h in headers if h["frame"] == h["frames"] - 1}
    gaps = sum(f.gap for f in result.frames)
    return {
        "device": result.device,
        "model": headers[0]["model"] if headers else None,
        "prime": headers[0].get("prime") if headers else None,  # model backend: reference or simulated
        "ecg_seconds": result.ecg.shape[1] / result.ecg_fs,
        "wall_seconds": result.wall_s,
        "beats": len(beats),
        "frames": len(headers),
        "frames_lost": gaps,
        "heart_rate_bpm_mean": float(np.mean([h["hr"] for h in last_frame.values()])) if last_frame else None,
        "beat_to_last_frame_latency": _percentiles([h["latency"] for h in last_frame.values()]),
        "frame_latency": _percentiles([h["latency"] for h in headers]),
        "statuses": [{"device": s.device, "code": s.status.get("code"), "message": s.status.get("message")} for s in result.statuses],
        "counters": result.counters,
        "lv_area_measured": has_areas,
    }


async def run_demo(options: DemoOptions) -> DemoResult:
    """Stream, then write every output; the result carries the file paths and summary.
    OSError when --out cannot be a folder."""
    options.out.mkdir(parents=True, exist_ok=True)
    result = await stream(options)
    if not result.frames:
        raise RuntimeError("no frames arrived at the subscriber; is the ECG long enough for two beats?")
    write_outputs(result, options.out)
    return result
