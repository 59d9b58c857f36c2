"""Multi-stream batching: beats of many devices that are ready close together share one generator call.

Policy (one dispatcher per generator):
- A beat waits at most `window_s` (default 4 ms) for company: the dispatcher runs a batch
  as soon as the oldest waiting beat has waited that long, or at once when a full batch
  (`max_batch`) is waiting. At 75 bpm a device sends a beat every 0.8 s, so a few
  milliseconds of waiting cost little latency and, with many devices, gather most of
  the beats that are ready into one call.
- A batch takes waiting beats oldest first, at most one per device (a device's next beat
  starts from the frame its previous beat ends on) and only those with the oldest
  beat's lead count (one static shape per call).
- The batch is padded up to the next fixed size in {1, 2, 4, 8, 16, 32, 64}
  (`core.resident.BATCH_SIZES`): each size is one captured CUDA graph. Padded rows repeat
  a real row and are dropped; rows are independent (per-row attention, per-row seeds), so
  padding and batch company change no device's frames.
- Batches run one at a time, in the dispatcher's thread (the GPU serialises them anyway);
  beats that arrive meanwhile form the next batch. The engine's per-device queues bound
  what waits here (at most one beat per device is in flight).

`take_batch` is the policy as a pure function (tested on its own); `BeatBatcher` runs it
on a thread; `BatchingBackend` is the engine backend built on it: `render` (blocking, for
the engine's executor threads) and `render_async` (awaitable, no thread held while
waiting).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..core.resident import BATCH_SIZES, BeatRequest, BeatResult, ResidentGenerator
from .backends import BeatLike, LoopPrimedBackend, ReferenceLoops, device_seed, next_beat_seed
from .engine import RenderThreads

log = logging.getLogger(__name__)

PRIME_THREADS = 2  # devices primed at once (each takes the batches' lock for its GPU work)


@dataclass(frozen=True)
class BatchPolicy:
    window_s: float = 0.004            # longest a beat waits for company
    sizes: tuple[int, ...] = BATCH_SIZES

    def __post_init__(self) -> None:
        if self.window_s < 0 or not self.sizes or min(self.sizes) < 1:
            raise ValueError("window_s must be >= 0 and sizes positive")

    @property
    def max_batch(self) -> int:
        return max(self.sizes)


@dataclass
class Pending:
    device: str
    leads: int
    arrival: float                     # monotonic seconds
    request: Any = None
    future: Future = field(default_factory=Future)


def due(pending: Sequence[Pending], now: float, policy: BatchPolicy) -> float | None:
    """Seconds until a batch is due (0: now), None when nothing waits."""
    if not pending:
        return None
    if len({p.device for p in pending}) >= policy.max_batch:
        return 0.0
    oldest = min(p.arrival for p in pending)
    return max(0.0, oldest + policy.window_s - now)


def take_batch(pending: list[Pending], now: float, policy: BatchPolicy) -> list[Pending]:
    """Remove and return the batch to run now ([] when none is due yet).

    Oldest first, one beat per device, the oldest beat's lead count, at most max_batch."""
    wait = due(pending, now, policy)
    if wait is None or wait > 0:
        return []
    ordered = sorted(pending, key=lambda p: p.arrival)
    leads = ordered[0].leads
    batch: list[Pending] = []
    seen: set[str] = set()
    for p in ordered:
        if len(batch) == policy.max_batch:
            break
        if p.leads == leads and p.device not in seen:
            batch.append(p)
            seen.add(p.device)
    for p in batch:
        pending.remove(p)
    return batch


class BeatBatcher:
    """Collects requests from any thread and runs them in batches on one dispatcher thread."""

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        policy: BatchPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_batch = run_batch
        self.policy = policy or BatchPolicy()
        self.clock = clock
        self.batch_sizes: list[int] = []   # sizes of the batches run (for benchmarks and tests)
        self._pending: list[Pending] = []
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False  # a batch is running: what a close that runs out of time leaves behind
        self._thread = threading.Thread(target=self._loop, name="echopulse-batcher", daemon=True)
        self._thread.start()

    def submit(self, device: str, leads: int, request: Any) -> Future:
        """Queue one request; the future gets its result (or the batch's exception)."""
        item = Pending(device=device, leads=leads, arrival=self.clock(), request=request)
        with self._cond:
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._pending.append(item)
            self._cond.notify()
        return item.future

    def close(self, timeout: float = 10.0) -> None:
        """Fail the beats still waiting and stop the dispatcher; a batch in flight gets at
        most `timeout` seconds, then its (daemon) thread is left to finish or die with the process."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=timeout)
        if self._thread.is_alive() and self._busy:  # an idle dispatcher only needs a moment to see the close
            log.warning("a batch still running after %g s at close: left behind", timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        for p in self._pending:
                            if p.future.set_running_or_notify_cancel():
                                p.future.set_exception(RuntimeError("batcher closed"))
                        self._pending.clear()
                        return
                    # a caller that gave up (its task cancelled at shutdown) cancels its
                    # future; such beats are dropped here, the rest can no longer be cancelled
                    batch = [p for p in take_batch(self._pending, self.clock(), self.policy)
                             if p.future.set_running_or_notify_cancel()]
                    if batch:
                        break
                    self._cond.wait(timeout=due(self._pending, self.clock(), self.policy))
            self.batch_sizes.append(len(batch))
            self._busy = True
            try:
                results = self.run_batch([p.request for p in batch])
            except Exception as err:  # the batch fails as a whole; each caller sees why
                log.exception("batch of %d failed", len(batch))
                for p in batch:
                    p.future.set_exception(err)
                continue
            finally:
                self._busy = False
            for p, result in zip(batch, results):
                p.future.set_result(result)


class BatchingBackend(LoopPrimedBackend):
    """The learned generator with beats of all devices batched (`ResidentGenerator.generate`).

    A device is primed with its patient's loop from `references`, or else from its
    simulated heart, as in the `model` backend."""

    def __init__(self, resident: ResidentGenerator, policy: BatchPolicy | None = None, warm_up_batch: int = 1,
                 references: Mapping[str, Any] | None = None) -> None:
        from ..core.simulate.beat_driven import BeatDrivenEcho

        self._sim = BeatDrivenEcho
        self.resident = resident
        self.references = ReferenceLoops(references, resident.preset.tokenizer.image_size)
        # batch sizes made ready before the first beat (graphs captured, compiles done):
        # a larger batch's first use pays its capture then, 0.3 to 4 s on an H200
        self.warm_sizes = tuple(size for size in (policy or BatchPolicy()).sizes if size <= max(1, warm_up_batch))
        self.name = f"model:{resident.name}"
        self.ecg_config = resident.preset.ecg
        self.batcher = BeatBatcher(resident.generate, policy)
        # Daemon threads for the primes: asyncio.to_thread's executor is joined when the
        # event loop closes, so a prime stuck behind a wedged batch outlived the stop.
        self._primer = RenderThreads(PRIME_THREADS, name="echopulse-prime")

    def new_state(self, device: str) -> Any:
        return {"seed": device_seed(device), "device": device, "state": None, "prime": None, "ref_version": None}

    def _request(self, state: Any, beat: BeatLike) -> BeatRequest:
        self.references.seen(state["device"])
        version = self.references.version(state["device"])
        size = self.resident.preset.tokenizer.image_size
        if state["state"] is None:
            loop, locked = self.prime_loop_for(state, beat, size, self.resident.frames_per_beat)
            state["state"] = self.resident.prime_loop(loop, seed=state["seed"], beat_locked=locked)
        elif version != state["ref_version"]:
            # the device's loop was replaced or removed while it streams: its context
            # changes, the video goes on from its last frame
            loop, locked = self.prime_loop_for(state, beat, size, self.resident.frames_per_beat)
            fresh = self.resident.prime_loop(loop, seed=state["seed"], beat_locked=locked)
            state["state"] = dataclasses.replace(state["state"], ref_ids=fresh.ref_ids, ref_valid=True)
        state["ref_version"] = version
        window = np.asarray(beat.window, np.float32)
        window = window if window.ndim == 2 else window[None]
        return BeatRequest(state["state"], window, np.asarray(beat.valid, bool), float(beat.rr), float(beat.r_time),
                           next_beat_seed(state))

    def _primes(self, state: Any) -> bool:
        """Whether the device's next beat primes it (first beat, or its loop changed)."""
        return state["state"] is None or self.references.version(state["device"]) != state["ref_version"]

    def submit(self, state: Any, beat: BeatLike) -> Future:
        return self._submit(state, self._request(state, beat))

    def _submit(self, state: Any, request: BeatRequest) -> Future:
        return self.batcher.submit(state["device"], request.window.shape[0], request)

    def render(self, state: Any, beat: BeatLike) -> tuple[np.ndarray, np.ndarray]:
        result: BeatResult = self.submit(state, beat).result()
        return result.frames, result.times

    async def render_async(self, state: Any, beat: BeatLike) -> tuple[np.ndarray, np.ndarray]:
        """For the event loop: waits for the batch without holding an executor thread. A
        beat that primes its device (its first, or the first after its loop changed on a
        reload: the simulated heart or the loop file, a tokenizer encode, tens of ms, more at
        the paper size) is built on a worker thread, so the loop keeps reading sources."""
        if self._primes(state):
            request = await asyncio.get_running_loop().run_in_executor(self._primer, self._request, state, beat)
        else:
            request = self._request(state, beat)
        result: BeatResult = await asyncio.wrap_future(self._submit(state, request))
        return result.frames, result.times

    def warm_up(self) -> None:
        self.resident.warm_up(batch_sizes=self.warm_sizes)

    def close(self, timeout: float | None = None) -> None:
        self._primer.shutdown(wait=False, cancel_futures=True)  # a prime in flight dies with the process
        self.batcher.close(10.0 if timeout is None else timeout)


def batched_model_backend(
    checkpoint: str | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_window_ms: float = 4.0,
    cuda_graphs: bool | None = None,
    kernels: str | None = None,
    compile: bool = False,
    warm_up_batch: int = 1,
    references: Mapping[str, Any] | None = None,
) -> BatchingBackend:
    """The `model` backend with multi-stream batching over one `ResidentGenerator`.

    On CUDA the pipeline is captured in graphs and runs the CuPy kernels by default (when
    CuPy imports); on CPU it runs eagerly. `compile` puts the beat's models through
    torch.compile first (on an H200: 22.8 → 21.4 ms a beat, for about 40 s of compiling at
    start; docs/gpu.md). `warm_up_batch`: the batch sizes up to this one are captured (or
    run once) at start, in every key layout, so no beat waits for a capture; each is a
    graph and its memory. Raises ValueError for settings the device cannot honour (graphs
    or CuPy kernels on CPU, an unknown precision) or out of range."""
    from ..core.generator import Generator

    # settings first: a wrong one fails before the model loads
    if batch_window_ms < 0:
        raise ValueError(f"batch window must be >= 0 ms, got {batch_window_ms}")
    if not 1 <= warm_up_batch <= max(BATCH_SIZES):
        raise ValueError(f"warm_up_batch must be 1..{max(BATCH_SIZES)}, got {warm_up_batch}")
    generator = Generator.load(checkpoint, device=device) if checkpoint else Generator.default(device=device)
    on_cuda = generator.device.type == "cuda"
    if kernels is None:
        kernels = "cupy" if on_cuda and _cupy_imports() else "torch"
    resident = ResidentGenerator(generator, precision=precision, kernels=kernels,
                                 graphs=on_cuda if cuda_graphs is None else cuda_graphs, compile=compile)
    log.info("model backend: batching within %.1f ms on %s (%s, kernels %s, graphs %s, compiled %s)", batch_window_ms,
             generator.device, precision, kernels, resident.graphs is not None, compile)
    return BatchingBackend(resident, BatchPolicy(window_s=batch_window_ms / 1000.0), warm_up_batch=warm_up_batch,
                           references=references)


def _cupy_imports() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy built for another CUDA failing at import
        return False
    return True
