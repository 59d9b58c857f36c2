"""Backends turn one detected beat into that beat's echo frames, behind one interface.

- ``sim``: the simulator's heart (`core.simulate.beat_driven.BeatDrivenEcho`) driven by the
  detected R times, one heart per device, seeded from the device id so a device always
  gets the same heart. A baseline, and a way to run the whole stream without a model.
- ``model``: the learned generator (`core.generator.Generator`), the default once it exists.
  With ``batching`` (the default on CUDA) beats of all devices that are ready within a few
  milliseconds share one call of the resident generator (`stream/batching.py`: policy,
  CUDA graphs, CuPy kernels); without it each device renders on its own executor thread.

The model backends prime each device, at its first beat, with one cardiac cycle of echo:
the patient's own loop when one was given for that device id (`references`, read by
`core/reference_loop.py`), otherwise a loop of the device's simulated heart, whose EF is
not the patient's. Every frame says which in its `prime` header field.

`render` runs in an executor thread (the engine keeps the event loop free for sources),
at most one call per device at a time, so per-device state needs no lock.
"""
from __future__ import annotations

import importlib.util
import logging
import zlib
from abc import ABC, abstractmethod
from typing import Any, Mapping, Protocol

import numpy as np

log = logging.getLogger(__name__)


class BeatLike(Protocol):
    """What a backend reads from a beat (`stream.beats.Beat` has these and more)."""

    index: int
    r_time: float
    rr: float
    window: np.ndarray   # leads × W at the model rate
    valid: np.ndarray    # W booleans: False where the stream had not delivered yet


def device_seed(device: str) -> int:
    """A seed that is the same for a device id in every run (Python's hash() is salted)."""
    return zlib.crc32(device.encode("utf-8"))


def beat_seed(state_seed: int, count: int) -> int:
    """Reproducible per (device, beat): the device's seed and the count of its beats."""
    return (state_seed + 1_000_003 * int(count)) % (2**31)


def next_beat_seed(state: dict) -> int:
    """The seed of a device's next beat, from a count kept in its backend state: the beat
    detector's own index starts again after every restart (a gap, a reset), and two beats
    of one device would then share their sampling noise."""
    count = state.get("beats", 0)
    state["beats"] = count + 1
    return beat_seed(state["seed"], count)


class Backend(ABC):
    """Makes frames (F×H×W uint8) and their ECG times (F seconds) for one beat."""

    name: str
    ecg_config: Any = None  # EcgEncoderConfig of the windows the backend wants (None: default)

    @abstractmethod
    def new_state(self, device: str) -> Any:
        """Per-device state, made when the device first sends ECG."""

    @abstractmethod
    def render(self, state: Any, beat: BeatLike) -> tuple[np.ndarray, np.ndarray]:
        """Frames and times for `beat`; runs in a worker thread."""

    def warm_up(self) -> None:
        """Compile/load whatever the first beat would otherwise wait for (optional)."""

    def frame_fields(self, state: Any) -> dict[str, Any]:
        """Extra header fields for a device's frames (optional), e.g. how it was primed."""
        return {}

    def set_references(self, specs: Mapping[str, Any]) -> list[str]:
        """Replace the patients' echo loops (model backends); returns the devices whose loop
        changed. ValueError when a file cannot be used or the backend takes none."""
        raise ValueError(f"the {self.name} backend takes no reference loops (they prime the model backend)")

    def close(self, timeout: float | None = None) -> None:
        """Release resources (optional), waiting at most `timeout` seconds for work in
        flight (None: the backend's own limit); the engine passes what is left of its stop."""


class ReferenceLoops:
    """The patients' own echo loops, by device id, for the model backends.

    `specs` maps a device id to a file (`core/reference_loop.py`: video, DICOM, NumPy, with
    ?frames=, ?crop=, ?fit=). Raises ValueError naming the device and file when one cannot
    be used, so a wrong path stops the daemon before it serves anyone. `replace` swaps in
    a new set while the engine runs (`serve` on SIGHUP); each device's loop has a version,
    so a backend sees that its device's loop changed and re-primes at the next beat."""

    def __init__(self, specs: Mapping[str, Any] | None, size: int) -> None:
        self.size = size
        self.loops: dict[str, Any] = {}
        self._versions: dict[str, int] = {}
        self._seen: set[str] = set()
        self.replace(specs or {})

    def replace(self, specs: Mapping[str, Any]) -> list[str]:
        """Read every file of `specs`, then make them the loops; a file that cannot be used
        raises ValueError and changes nothing. Returns the devices whose loop changed."""
        from ..core.reference_loop import ReferenceLoopError, load_reference_loop
        from .protocol import ProtocolError, check_device

        loaded: dict[str, Any] = {}
        for device, spec in specs.items():
            try:
                check_device(device)
                loaded[device] = load_reference_loop(spec, self.size)
            except (ReferenceLoopError, ProtocolError) as err:
                raise ValueError(f"reference for {device}: {err}") from None
        changed = sorted(d for d in set(loaded) | set(self.loops)
                         if d not in loaded or d not in self.loops or not np.array_equal(loaded[d].frames, self.loops[d].frames))
        # loops first, versions after: a render that reads the old version with the new loop
        # only re-primes once more, with the same loop
        self.loops = loaded
        for device in changed:
            self._versions[device] = self._versions.get(device, 0) + 1
            if device in loaded:
                log.info("reference loop for %s: %s", device, loaded[device].describe())
            elif device in self._seen:
                log.info("reference loop for %s removed: it goes on from a simulated heart", device)
        return changed

    def frames(self, device: str) -> np.ndarray | None:
        """One cycle of the device's patient (uint8 T×H×W, R first), or None."""
        loop = self.loops.get(device)
        return None if loop is None else loop.frames

    def version(self, device: str) -> int:
        """Changes whenever the device's loop does."""
        return self._versions.get(device, 0)

    def seen(self, device: str) -> None:
        """Note that `device` has streamed. The first time a device without a loop streams
        while loops wait for devices never seen, a warning names them: a device id misspelt
        on either side would otherwise leave its patient on a simulated heart in silence."""
        if device in self._seen:
            return
        self._seen.add(device)
        waiting = self.waiting()
        if device not in self.loops and waiting:
            log.warning("%s has no reference loop and starts from a simulated heart, while the loops of %s wait "
                        "for devices not seen yet (is one of them this device under another id?)",
                        device, ", ".join(waiting))

    def waiting(self) -> list[str]:
        """Devices with a loop that have not streamed yet."""
        return sorted(set(self.loops) - self._seen)

    def __len__(self) -> int:
        return len(self.loops)


def simulated_loop(sim_cls: Any, seed: int, size: int, frames_per_beat: int, beat: BeatLike) -> np.ndarray:
    """A beat-locked loop of a device's simulated heart at the beat's RR: the previous beat's
    last frame, then this beat's frames (the prime of a device without its patient's echo)."""
    sim = sim_cls(seed=seed, size=size, frames_per_beat=frames_per_beat)
    frames, _ = sim.render_beat(float(beat.r_time), float(beat.rr))
    return np.concatenate([frames[-1:], frames])


class LoopPrimedBackend(Backend):
    """What both model backends share: the patients' loops, and the `prime` header field
    their per-device state (a dict) records."""

    references: ReferenceLoops

    def frame_fields(self, state: Any) -> dict[str, Any]:
        return {"prime": state["prime"]} if state and state.get("prime") else {}

    def set_references(self, specs: Mapping[str, Any]) -> list[str]:
        return self.references.replace(specs)

    def prime_loop_for(self, state: Any, beat: BeatLike, size: int, frames_per_beat: int) -> tuple[np.ndarray, bool]:
        """The loop a device is primed with and whether it is beat-locked: its patient's
        (any frame count), else a loop of its simulated heart at this beat's RR. Records
        which one in state["prime"]."""
        own = self.references.frames(state["device"])
        if own is not None:
            state["prime"] = "reference"
            return own, False
        state["prime"] = "simulated"
        return simulated_loop(self._sim, state["seed"], size, frames_per_beat, beat), True


class SimBackend(Backend):
    """The simulator's beat-driven heart, one per device."""

    name = "sim"

    def __init__(self, size: int = 64, frames_per_beat: int = 10) -> None:
        from ..core.simulate.beat_driven import BeatDrivenEcho

        self._make = BeatDrivenEcho
        self.size = size
        self.frames_per_beat = frames_per_beat

    def new_state(self, device: str) -> Any:
        return self._make(seed=device_seed(device), size=self.size, frames_per_beat=self.frames_per_beat)

    def render(self, state: Any, beat: BeatLike) -> tuple[np.ndarray, np.ndarray]:
        frames, times = state.render_beat(float(beat.r_time), float(beat.rr))
        return np.ascontiguousarray(frames, dtype=np.uint8), np.asarray(times, dtype=np.float64)

    def warm_up(self) -> None:
        self.render(self.new_state("warm-up"), _warm_beat())


class ModelBackend(LoopPrimedBackend):
    """The learned generator: one resident model, one generator state per device.

    Weights are shared; each device gets its own `Generator` view over them (its own
    prime frame, reference loop and random stream). A device is primed at its first beat
    with its patient's loop from `references` (device id -> file), or else with a loop of
    its simulated heart (the `sim` backend's subject for that device) at that beat's RR.
    """

    def __init__(self, checkpoint: str | None = None, device: str | None = None,
                 references: Mapping[str, Any] | None = None) -> None:
        from ..core.generator import Generator
        from ..core.simulate.beat_driven import BeatDrivenEcho

        self._generator_cls = Generator
        self._sim = BeatDrivenEcho
        self.base = Generator.load(checkpoint, device=device) if checkpoint else Generator.default(device=device)
        self.references = ReferenceLoops(references, self.base.preset.tokenizer.image_size)
        self.name = f"model:{self.base.name}"
        self.ecg_config = self.base.preset.ecg

    def new_state(self, device: str) -> Any:
        b = self.base
        seed = device_seed(device)
        generator = self._generator_cls(b.preset, b.tokenizer, b.ecg_encoder, b.transformer, b.critic,
                                        device=b.device, seed=seed, name=b.name)
        return {"generator": generator, "seed": seed, "device": device, "prime": None, "ref_version": None}

    def render(self, state: Any, beat: BeatLike) -> tuple[np.ndarray, np.ndarray]:
        generator = state["generator"]
        self.references.seen(state["device"])
        version = self.references.version(state["device"])
        size = self.base.preset.tokenizer.image_size
        if state["prime"] is None:
            generator.prime_loop(*self.prime_loop_for(state, beat, size, generator.frames_per_beat))
        elif version != state["ref_version"]:
            # the device's loop was replaced or removed while it streams: its context
            # changes, the video goes on from its last frame
            last = generator.state.prime
            generator.prime_loop(*self.prime_loop_for(state, beat, size, generator.frames_per_beat))
            generator.state.prime = last
        state["ref_version"] = version
        frames, times = generator.generate_beat(beat.window, beat.valid, float(beat.r_time), float(beat.rr),
                                                seed=next_beat_seed(state))
        return np.ascontiguousarray(frames, dtype=np.uint8), np.asarray(times, dtype=np.float64)

    def warm_up(self) -> None:
        self.render(self.new_state("warm-up"), _warm_beat(self.ecg_config))


def _warm_beat(config: Any = None) -> BeatLike:
    """A plausible beat for warm-up renders: 75 bpm, a window of zeros (1 lead), all valid."""
    from types import SimpleNamespace

    from ..core.config import EcgEncoderConfig

    n = (config or EcgEncoderConfig()).window_samples
    return SimpleNamespace(index=0, r_time=0.0, rr=0.8, window=np.zeros((1, n), np.float32), valid=np.ones(n, bool))


def model_available() -> bool:
    """True once `core/generator.py` exists in this installation."""
    try:
        return importlib.util.find_spec("echopulse.core.generator") is not None
    except ModuleNotFoundError:
        return False


def shipped_model() -> bool:
    """True when a trained generator ships with the package (core/weights/tiny)."""
    if not model_available():
        return False
    from ..core.generator import DEFAULT_WEIGHTS

    return (DEFAULT_WEIGHTS / "transformer.json").is_file()


def default_backend() -> str:
    """`model` once a trained generator ships; until then `sim` (an untrained model makes noise)."""
    return "model" if shipped_model() else "sim"


BATCHING_OPTIONS = ("precision", "batch_window_ms", "cuda_graphs", "kernels", "compile", "warm_up_batch")
_SETTINGS = {"sim": {"size", "frames_per_beat"},
             "model": {"checkpoint", "device", "batching", "references", *BATCHING_OPTIONS}}


def _torch_device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def make_backend(name: str | None = None, **options: Any) -> Backend:
    """Build a backend by name (None: the default). Raises ValueError for an unknown name or
    settings that do not fit, RuntimeError when the model backend is asked for before the
    generator exists, OSError for a checkpoint that cannot be read.

    Model options: `checkpoint`, `device`, `references` (device id -> the patient's echo
    loop file), `batching` (None: on for CUDA, off for CPU), and
    with batching `precision` ("fp32", "bf16"), `batch_window_ms`, `cuda_graphs`, `kernels`, `compile`,
    `warm_up_batch`."""
    name = name or default_backend()
    if not options.get("references"):
        options.pop("references", None)
    for key in ("checkpoint", "batching", "references", *BATCHING_OPTIONS):
        if options.get(key) is None:
            options.pop(key, None)
        elif name != "model":
            raise ValueError(f"{key} is for the model backend (--backend model)")
    # Settings another backend takes (a config file's [backend] without a name is read
    # before the default is known) are refused here with their names, not as a TypeError.
    known = _SETTINGS.get(name, set())
    foreign = sorted(key for key in options if key not in known)
    if name in _SETTINGS and foreign:
        raise ValueError(f"{', '.join(foreign)}: not settings of the {name} backend (it takes {', '.join(sorted(known))})")
    if name == "sim":
        try:
            return SimBackend(**options)
        except ImportError as err:
            raise RuntimeError(f"the sim backend needs core/simulate/beat_driven.py: {err}") from None
    if name == "model":
        if not model_available():
            raise RuntimeError("the model backend needs core/generator.py, which this installation lacks; use --backend sim")
        batching = options.pop("batching", None)
        tuned = {k: options.pop(k) for k in BATCHING_OPTIONS if k in options}  # None values were dropped above
        if batching is None:
            batching = _torch_device(options.get("device")).startswith("cuda")
        if batching:
            from .batching import batched_model_backend

            return batched_model_backend(**options, **tuned)
        if tuned:
            raise ValueError(f"{', '.join(sorted(tuned))} only apply with batching (the resident generator)")
        return ModelBackend(**options)
    raise ValueError(f"unknown backend {name!r}; known: sim, model")
