"""Generator latency per stage and per beat, eager vs bf16 vs CUDA graph (+ CuPy), and streams held.

CPU (always): the `tiny` preset, resident eager pipeline (inference mode, static
buffers), fp32 and bf16 (oneDNN uses AMX/AVX-512 bf16 where the CPU has them), 1 and 2
torch threads, next to the plain `Generator.generate_beat` loop; stage p50/p99 (ECG
encode, each decode step, tokenizer decode, re-prime); `torch.compile` of the
transformer (full runs only: its compile takes about a minute here); the largest number
of 75-bpm streams a real-time load test holds with batching.

GPU (when CUDA is available): the `paper` preset at batch 1, side by side in one run:
eager fp32, eager bf16, CUDA graph bf16, CUDA graph bf16 + CuPy kernels; the fastest
again for image- and gap-primed devices (the other key layouts); a kernel profile of
one eager beat; each attention backend at the cross-attention's shape; bf16 accuracy
against fp32; then batched graph replays (1..64) and the streams load test.

Latency "beat" = `ResidentGenerator.generate`: inputs copied in, the whole pipeline,
frames copied out to host memory. The load tests go one step further: every frame is
published over ZeroMQ and counted by a subscriber (see `load_test`). Devices are
loop-primed unless a row says otherwise. Weights are random (timing does not depend on
them).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Iterator

import numpy as np
import torch

from echopulse.core.config import Preset
from echopulse.core.generator import Generator
from echopulse.core.resident import (
    BATCH_SIZES, BeatRequest, ResidentGenerator, StageTimer, StaticBuffers, configure_backends, precision_report, threads,
)
from echopulse.stream.batching import BatchPolicy, BeatBatcher
from echopulse.stream.protocol import frame_topic

log = logging.getLogger(__name__)

BEAT_S = 60.0 / 75.0  # 75 bpm
PROBE_DEVICE = "probe"


# helpers


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _row(metric: str, value: float, unit: str, target: str | None = None) -> dict:
    return {"metric": metric, "value": float(value), "unit": unit, "target": target}


def _pct_rows(label: str, xs_ms: list[float], target_p50: str | None = None, target_p99: str | None = None) -> list[dict]:
    p50, p99 = _pct(xs_ms)
    return [_row(f"{label} p50", p50, "ms", target_p50), _row(f"{label} p99", p99, "ms", target_p99)]


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device.type == "cuda" else None


# How the benchmark's devices are primed, and so which key layout their beats run
# (`core.transformer.key_layout`): "loop" = a reference loop and whole ECG windows
# (dense, the recommended set-up), "image" = one frame (no_ref), "gap" = a reference
# loop and an ECG window that lost its last samples (masked).
PRIMINGS = {"loop": "dense", "image": "no_ref", "gap": "masked"}


def _requests(res: ResidentGenerator, count: int, seed: int = 0, priming: str = "loop") -> list[BeatRequest]:
    rng = np.random.default_rng(seed)
    tok, n = res.preset.tokenizer, res.preset.ecg.window_samples
    out = []
    for i in range(count):
        clip = rng.integers(0, 256, (tok.frames, tok.image_size, tok.image_size), dtype=np.uint8)
        state = res.prime_image(clip[-1], seed=i) if priming == "image" else res.prime_loop(clip, seed=i)
        window = rng.standard_normal((1, n)).astype(np.float32)
        valid = np.arange(n) < (n - 10 if priming == "gap" else n)
        out.append(BeatRequest(state, window, valid, BEAT_S, 0.0, seed=1000 + i))
    return out


def beat_latencies(res: ResidentGenerator, batch: int, repeats: int, warmup: int = 1, priming: str = "loop") -> list[float]:
    """Milliseconds per `generate` call of `batch` devices (a device's stream continues)."""
    requests = _requests(res, batch, priming=priming)
    for _ in range(warmup):
        res.generate(requests)
    out = []
    for k in range(repeats):
        for r in requests:
            r.seed += 1
        t0 = time.perf_counter()
        res.generate(requests)  # ends with the frames on the host: synchronised
        out.append((time.perf_counter() - t0) * 1000)
    return out


def stage_latencies(res: ResidentGenerator, repeats: int) -> dict[str, list[float]]:
    """Milliseconds per pipeline stage at batch 1 (eager, synchronised between stages)."""
    buf = res.buffers(1, 1)
    res.fill(buf, _requests(res, 1))
    timer = StageTimer(_sync_for(res.device))
    layout = PRIMINGS["loop"]
    res.run(buf, timer=timer, layout=layout)  # warm-up
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        timer.start()
        res.run(buf, timer=timer, layout=layout)
        for name, s in timer.times.items():
            out.setdefault(name, []).append(s * 1000)
    return out


def stage_rows(label: str, stages: dict[str, list[float]]) -> list[dict]:
    rows = []
    for name, xs in stages.items():
        rows += _pct_rows(f"{label} {name}", xs)
    steps = [np.median(xs) for name, xs in stages.items() if name.startswith("decode_step_")]
    rows.append(_row(f"{label} decode steps", len(steps), "steps"))
    rows.append(_row(f"{label} mean decode step p50", float(np.mean(steps)), "ms"))
    return rows


class _PublishSide:
    """The engine's publishing side for a load test: results handed over by the batcher's
    callbacks go out over a real ZeroMQ PUB socket from one thread (as the engine's event
    loop does), and a SUB socket in another thread counts what arrives. A beat's latency
    is read when its last frame has left the publisher."""

    def __init__(self) -> None:
        import zmq  # the GPU box may lack pyzmq; the caller falls back to frames on host

        from echopulse.stream.publish import Publisher

        self.context = zmq.Context()
        self.publisher = Publisher("tcp://127.0.0.1:0", hwm=1_000_000, context=self.context)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"echo/")
        self.sub.connect(self.publisher.endpoint)
        self.received = 0
        self.latencies: list[float] = []
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._join()
        self._threads = [threading.Thread(target=self._publish_loop, daemon=True),
                         threading.Thread(target=self._receive_loop, daemon=True)]
        for t in self._threads:
            t.start()

    def _join(self) -> None:
        """Wait until the SUB socket is connected (ZeroMQ's slow joiner), by a probe beat."""
        probe = np.zeros((1, 8, 8), np.uint8)
        for _ in range(200):
            self.publisher.publish_frames(PROBE_DEVICE, probe, times=[0.0], beat=0, r_time=0.0, rr=BEAT_S,
                                          model="bench", capture=time.time())
            if self.sub.poll(10):
                while self.sub.poll(50):
                    self.sub.recv_multipart()
                return
        raise RuntimeError("load test subscriber never joined")

    def hand_over(self, device: str, beat: int, result: object, due_at: float) -> None:
        self._queue.put((device, beat, result, due_at))

    def _publish_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            device, beat, result, due_at = item
            self.publisher.publish_frames(device, result.frames, times=result.times, beat=beat, r_time=0.0,
                                          rr=BEAT_S, model="bench", capture=time.time())
            self.latencies.append((time.monotonic() - due_at) * 1000)

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(50):
                topic = self.sub.recv_multipart(copy=False)[0].bytes
                self.received += topic != frame_topic(PROBE_DEVICE)  # a late join probe is not a beat's frame

    def close(self, expected_frames: int) -> int:
        """Publish what is queued, wait (at most 5 s) for the frames to arrive; frames received."""
        self._queue.put(None)
        self._threads[0].join(timeout=30)
        deadline = time.monotonic() + 5
        while self.received < expected_frames and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stop.set()
        self._threads[1].join(timeout=5)
        self.sub.close(linger=0)
        self.publisher.close()
        self.context.term()
        return self.received


def load_test(res: ResidentGenerator, streams: int, duration_s: float, policy: BatchPolicy, publish: bool = True) -> dict:
    """`streams` devices at 75 bpm, phases spread over one beat, for `duration_s`, through the
    batcher. Latency = the beat's last frame sent on a ZeroMQ PUB socket (a SUB counts
    them arriving) − the moment the beat was due; with `publish=False`, or without pyzmq,
    frames on the host − due. Held: every beat done and p99 latency within one beat
    period (the backlog cannot grow)."""
    requests = _requests(res, streams, seed=streams)  # loop-primed: the dense layout
    if res.graphs is not None:  # captures stay out of the measured run; eager needs no warm-up per size
        res.warm_up(batch_sizes=sorted({s for s in policy.sizes if s <= max(streams, 1)}), layouts=(PRIMINGS["loop"],))
    side = None
    if publish:
        try:
            side = _PublishSide()
        except ImportError:
            log.warning("pyzmq not importable: load-test latency ends at frames on the host, not published")
    on_host: list[float] = []
    lock = threading.Lock()
    beats = max(1, int(duration_s / BEAT_S))
    frames_expected = beats * streams * res.frames_per_beat
    batcher = BeatBatcher(res.generate, policy)
    try:
        start = time.monotonic() + 0.05
        schedule = sorted((start + (i / streams) * BEAT_S + k * BEAT_S, i, k) for k in range(beats) for i in range(streams))
        futures = []
        for due_at, i, k in schedule:
            delay = due_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            fut = batcher.submit(f"dev{i}", 1, requests[i])

            def done(f: Future, due_at: float = due_at, device: str = f"dev{i}", beat: int = k) -> None:
                with lock:
                    on_host.append((time.monotonic() - due_at) * 1000)
                if side is not None and f.exception() is None:
                    side.hand_over(device, beat, f.result(), due_at)

            fut.add_done_callback(done)
            futures.append(fut)
        for f in futures:
            f.result(timeout=120)
    finally:
        batcher.close()
        received = side.close(frames_expected) if side is not None else None
    latencies = side.latencies if side is not None else on_host
    p50, p99 = _pct(latencies)
    host50, host99 = _pct(on_host)
    sizes = batcher.batch_sizes
    return {"streams": streams, "beats": len(on_host), "p50_ms": p50, "p99_ms": p99,
            "latency_ends": "last frame published" if side is not None else "frames on host",
            "on_host_p50_ms": host50, "on_host_p99_ms": host99,
            "frames_received": received, "frames_expected": frames_expected,
            "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
            "held": p99 <= BEAT_S * 1000 and (received is None or received == frames_expected)}


def streams_held(res: ResidentGenerator, counts: list[int], duration_s: float, policy: BatchPolicy) -> tuple[int, list[dict]]:
    """The largest count in `counts` (ascending) held in real time; stops at the first failure."""
    held, trials = 0, []
    for count in counts:
        trial = load_test(res, count, duration_s, policy)
        trials.append(trial)
        log.info("load test: %s", trial)
        if not trial["held"]:
            break
        held = count
    return held, trials


# CPU


def _compile_probe(base: Generator, repeats: int) -> dict:
    """The bf16 beat with its models under torch.compile (compile time apart)."""
    res = ResidentGenerator(base, precision="bf16", compile=True)
    t0 = time.perf_counter()
    res.warm_up(batch_sizes=(1,))
    compile_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "beat_ms": beat_latencies(res, 1, repeats)}


def _section(raw: dict, name: str, t0: float) -> float:
    now = time.perf_counter()
    raw.setdefault("section_s", {})[name] = now - t0
    return now


def cpu_part(quick: bool) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    raw: dict = {}
    base = Generator.untrained("tiny", device="cpu")
    repeats = 3 if quick else 15
    fp32 = ResidentGenerator(base)
    bf16 = ResidentGenerator(base, precision="bf16")
    # 2 threads pay only on an idle machine; CI-sized runs measure 1
    thread_counts = (1,) if quick else (1, 2)
    t0 = time.perf_counter()
    for count in thread_counts:
        with threads(count):
            for label, res in (("fp32", fp32), ("bf16", bf16)):
                xs = beat_latencies(res, 1, repeats)
                raw[f"tiny_cpu_{label}_{count}thr_ms"] = xs
                rows += _pct_rows(f"tiny beat, CPU {count} thr, resident eager {label}", xs,
                                  target_p99=f"<= {BEAT_S * 1000:.0f} (real time)")
    t0 = _section(raw, "beats", t0)
    best_threads = min(thread_counts, key=lambda c: np.median(raw[f"tiny_cpu_bf16_{c}thr_ms"]))
    raw["best_threads"] = best_threads
    with threads(best_threads):
        # the peer: the plain facade loop (torch.Generator noise, no static buffers), primed
        # like the resident runs above (a reference loop: the same key layout)
        rng = np.random.default_rng(0)
        window = rng.standard_normal((1, base.preset.ecg.window_samples)).astype(np.float32)
        tok = base.preset.tokenizer
        base.prime_loop(rng.integers(0, 256, (tok.frames, tok.image_size, tok.image_size), dtype=np.uint8))
        valid = np.ones(window.shape[1], bool)
        base.generate_beat(window, valid, 0.0, BEAT_S)
        xs = []
        for k in range(repeats):
            tb = time.perf_counter()  # not t0: that one times the whole section
            base.generate_beat(window, valid, 0.0, BEAT_S, seed=k)
            xs.append((time.perf_counter() - tb) * 1000)
        raw["tiny_cpu_facade_ms"] = xs
        rows += _pct_rows(f"tiny beat, CPU {best_threads} thr, Generator.generate_beat (peer)", xs)
        t0 = _section(raw, "peer", t0)
        for label, res in (("fp32", fp32), ("bf16", bf16)):
            stages = stage_latencies(res, 2 if quick else 10)
            raw[f"tiny_cpu_{label}_stages_ms"] = stages
            rows += stage_rows(f"tiny CPU {best_threads} thr {label}", stages)
        t0 = _section(raw, "stages", t0)
        for batch in (2, 4) if not quick else (2,):
            xs = beat_latencies(bf16, batch, 2 if quick else 10)
            raw[f"tiny_cpu_bf16_batch{batch}_ms"] = xs
            rows.append(_row(f"tiny batch {batch}, CPU {best_threads} thr bf16, per call p50", _pct(xs)[0], "ms"))
        t0 = _section(raw, "batches", t0)
        report = precision_report(fp32, bf16, _requests(fp32, 1 if quick else 4))
        t0 = _section(raw, "precision", t0)
        raw["tiny_cpu_bf16_vs_fp32"] = report
        rows.append(_row("tiny CPU bf16 vs fp32 token agreement", report["token_agreement"], "fraction"))
        rows.append(_row("tiny CPU bf16 vs fp32 pixel MAE (end to end)", report["pixel_mae"], "grey levels"))
        rows.append(_row("tiny CPU bf16 vs fp32 pixel MAE (decoder alone)", report["decode_pixel_mae"], "grey levels"))
        counts = [1, 2] if quick else [1, 2, 3, 4, 6, 8]
        held, trials = streams_held(bf16, counts, duration_s=2 * BEAT_S if quick else 6 * BEAT_S, policy=BatchPolicy(window_s=0.004))
        raw["tiny_cpu_load_tests"] = trials
        t0 = _section(raw, "load_test", t0)
        rows.append(_row(f"tiny CPU {best_threads} thr bf16: 75-bpm streams held in real time", held, "streams",
                         f"tested {counts[: len(trials)]}"))
        if not quick:  # a compile takes about half a minute here: full runs only
            probe = _compile_probe(base, repeats)
            raw["tiny_cpu_compile_probe"] = probe
            rows += _pct_rows(f"tiny beat, CPU {best_threads} thr, eager bf16 + torch.compile", probe["beat_ms"],
                              target_p99=f"compile {probe['compile_s']:.0f} s")
    return rows, raw


# GPU


def attention_kernels(batch_rows: int, queries: int, keys: int, heads: int, dim_head: int, repeats: int = 20) -> list[dict]:
    """Each SDPA backend at the transformer's cross-attention shape, with and without a key
    mask (bf16, forward): which kernel a layout gets, and what it costs. GPU only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch_rows, heads, queries, dim_head, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch_rows, heads, keys, dim_head, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    mask = torch.rand(batch_rows, 1, 1, keys, device="cuda", generator=g) > 0.01
    flop = 4 * batch_rows * heads * queries * keys * dim_head
    out = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        for masked in (False, True):
            entry = {"backend": backend.name, "masked": masked, "rows": batch_rows}
            try:
                with sdpa_kernel(backend):
                    run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)  # noqa: E731
                    run()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    times = []
                    for _ in range(repeats):
                        start.record()
                        run()
                        end.record()
                        end.synchronize()
                        times.append(start.elapsed_time(end))
                entry["ms"] = float(np.median(times))
                entry["tflops"] = flop / entry["ms"] / 1e9
            except RuntimeError as err:  # a backend that refuses this shape or mask
                entry["error"] = str(err).splitlines()[0][:120]
            out.append(entry)
    return out


def stage_functions(res: ResidentGenerator, buf: StaticBuffers, layout: str) -> dict[str, Callable[[], None]]:
    """The beat pipeline cut in three, each a function over `buf` that can be captured on
    its own: ECG encode + contexts, the MaskGIT steps, tokenizer decode + re-prime.
    The contexts the second reads are those the first made last (held here)."""
    held: dict[str, tuple] = {}

    def contexts() -> None:
        with res.numerics():
            held["contexts"] = res.contexts(buf, layout)

    def steps() -> None:
        with res.numerics():
            res.decode(buf, *held["contexts"])

    def finish() -> None:
        with res.numerics():
            res.finish(buf)

    return {"ecg_encode_and_contexts": contexts, "decode_steps": steps, "tokenizer_decode_and_reprime": finish}


@torch.inference_mode()
def graph_stages(res: ResidentGenerator, repeats: int) -> dict[str, float]:
    """Median ms of each third of the beat, captured as its own CUDA graph and replayed
    (GPU), or run eagerly (CPU): where the whole-beat graph spends its time."""
    from echopulse.kernels.cuda_graph import capture

    buf = res.buffers(1, 1)
    res.fill(buf, _requests(res, 1))
    functions = stage_functions(res, buf, PRIMINGS["loop"])
    cuda = res.device.type == "cuda"
    runs = {name: (capture(fn).replay if cuda else fn) for name, fn in functions.items()}  # in order: each feeds the next
    sync = _sync_for(res.device)
    out = {}
    for name, run in runs.items():
        times = []
        for _ in range(repeats):
            if sync:
                sync()
            t0 = time.perf_counter()
            run()
            if sync:
                sync()
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = float(np.median(times))
    return out


def kernel_profile(res: ResidentGenerator, top: int = 15) -> dict:
    """The CUDA kernels of one batch-1 beat, eager or a graph replay (torch.profiler sees a
    graph's kernels through CUPTI): how many, their summed time against the beat's wall
    time, and the `top` ones by time."""
    from torch.profiler import ProfilerActivity, profile

    requests = _requests(res, 1)
    res.generate(requests)  # warm, and captured when graphs are on
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        res.generate(requests)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000
    events = prof.key_averages()
    kernel_ms = sum(e.device_time_total for e in events) / 1000
    ranked = sorted(events, key=lambda e: e.device_time_total, reverse=True)
    return {
        "wall_ms": wall_ms, "kernel_ms": kernel_ms, "kernels": int(sum(e.count for e in events)),
        "top": [{"kernel": e.key[:90], "calls": e.count, "ms": e.device_time_total / 1000} for e in ranked[:top]],
    }


def overlapped_replays(base: Generator, options: dict, repeats: int, lanes: int = 2) -> dict:
    """`lanes` generators (each its own weights, buffers and graphs), each replaying batch-1
    beats from its own thread on its own CUDA stream at the same time, against one alone:
    whether a batch-1 graph leaves enough of the GPU idle for another to use."""
    gens = [ResidentGenerator(base, **options) for _ in range(lanes)]
    for res in gens:
        res.warm_up(batch_sizes=(1,), layouts=(PRIMINGS["loop"],))
    alone = beat_latencies(gens[0], 1, repeats)
    latencies: list[list[float]] = [[] for _ in gens]
    spans: list[tuple[float, float]] = []  # each lane's (first start, last end): the timed part alone
    barrier = threading.Barrier(lanes)

    def lane(i: int) -> None:
        cuda = gens[i].device.type == "cuda"
        # not the default stream, which would serialise them (on CPU: the smoke test's threads)
        with torch.cuda.stream(torch.cuda.Stream()) if cuda else contextlib.nullcontext():
            requests = _requests(gens[i], 1, seed=i)
            gens[i].generate(requests)
            barrier.wait()
            first = time.perf_counter()
            for _ in range(repeats):
                for r in requests:
                    r.seed += 1
                t0 = time.perf_counter()
                gens[i].generate(requests)
                latencies[i].append((time.perf_counter() - t0) * 1000)
            spans.append((first, time.perf_counter()))

    threads_ = [threading.Thread(target=lane, args=(i,)) for i in range(lanes)]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    together = [x for xs in latencies for x in xs]
    return {"lanes": lanes, "alone_p50_ms": float(np.median(alone)), "together_p50_ms": float(np.median(together)),
            "together_p99_ms": float(np.percentile(together, 99)), "beats_per_s": lanes * repeats / wall,
            "alone_beats_per_s": 1000.0 / float(np.mean(alone))}


# called with the rows and raw figures so far after every GPU section (run.py writes them)
Progress = Callable[[list[dict], dict], None]


@contextlib.contextmanager
def _guarded(rows: list[dict], raw: dict, name: str, progress: Progress | None = None) -> Iterator[None]:
    """A GPU section that fails is recorded (row + raw["errors"]) and the run goes on:
    device time is scarce, so one failure must not lose the other figures. Its rows are
    logged and handed to `progress` as soon as it ends, so a run cut short by a time limit
    still leaves them."""
    first = len(rows)
    try:
        yield
    except Exception as err:  # recorded, logged with its traceback, not swallowed silently
        log.exception("GPU benchmark section %r failed", name)
        raw.setdefault("errors", {})[name] = repr(err)
        rows.append(_row(f"{name}: FAILED", 0.0, "error", repr(err)[:100]))
        torch.cuda.empty_cache()
    for row in rows[first:]:
        log.info("row: %s = %.4g %s %s", row["metric"], row["value"], row["unit"], row.get("target") or "")
    if progress is not None:
        try:
            progress(rows, raw)
        except Exception:  # a partial save that fails must not stop the measuring
            log.exception("could not save the results after section %r", name)


def gpu_part(
    quick: bool, device: str = "cuda", preset: Preset | str = "paper", progress: Progress | None = None
) -> tuple[list[dict], dict]:
    """The GPU comparison. `device`/`preset` exist for a CPU smoke run of this code
    (no graph variants there; the fastest eager variant stands in for the batches).
    `progress` gets the rows and raw figures after every section."""
    rows: list[dict] = []
    cuda = device == "cuda"
    raw: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else None,
                 "cupy": cuda and importlib.util.find_spec("cupy") is not None}
    configure_backends(device)
    base = Generator.untrained(preset, device=device)
    repeats = 10 if quick else 50

    def guarded(name: str) -> contextlib.AbstractContextManager:
        return _guarded(rows, raw, name, progress)

    variants: list[tuple[str, dict]] = [("eager fp32", {}), ("eager bf16", {"precision": "bf16"})]
    if cuda:
        variants.append(("graph bf16", {"precision": "bf16", "graphs": True}))
    if raw["cupy"]:
        cupy = {"precision": "bf16", "graphs": True, "kernels": "cupy"}
        variants += [
            ("graph bf16 + CuPy", cupy),
            # Inductor's fusions recorded inside our graph (the warm-up compiles the models)
            ("graph bf16 + CuPy + compile", {**cupy, "compile": True}),
        ]
    built: dict[str, ResidentGenerator] = {}
    for label, options in variants:
        with guarded(f"paper {label}"):
            log.info("GPU: %s, batch 1", label)
            res = ResidentGenerator(base, **options)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            res.warm_up(batch_sizes=(1,), layouts=(PRIMINGS["loop"],))
            raw[f"paper_{label}_warmup_s"] = time.perf_counter() - t0
            xs = beat_latencies(res, 1, repeats if "graph" in label else max(3, repeats // 3))
            raw[f"paper_{label}_ms"] = xs
            built[label] = res
            target = "<= 15 (issue 7)" if "graph" in label else None
            rows += _pct_rows(f"paper beat, GPU batch 1, {label}", xs, target_p50=target)
    if cuda and "eager bf16" in built:
        with guarded("paper eager bf16 kernel profile"):
            raw["paper_eager bf16_kernels"] = kernel_profile(built["eager bf16"])
            for entry in raw["paper_eager bf16_kernels"]["top"][:6]:
                rows.append(_row(f"paper eager bf16 kernel {entry['kernel'][:40]}", entry["ms"], "ms/beat", f"{entry['calls']} calls"))
    if cuda:
        with guarded("paper attention kernels"):
            t, h, w = base.transformer.grid
            cfg = base.preset.transformer
            keys = (t * h * w) + base.ecg_encoder.cfg.patches_per_lead + 1  # reference block, ECG patches, register
            raw["paper_attention_kernels"] = [
                *attention_kernels(2, t * h * w, keys, cfg.heads, cfg.dim_head),
                *attention_kernels(32, t * h * w, keys, cfg.heads, cfg.dim_head),
            ]
            for entry in raw["paper_attention_kernels"]:
                if "ms" in entry:
                    rows.append(_row(f"paper cross-attention {entry['rows']} rows, {entry['backend']}{' masked' if entry['masked'] else ''}",
                                     entry["ms"], "ms", f"{entry['tflops']:.0f} TFLOP/s"))
    for label in ("eager fp32", "eager bf16"):
        if label in built:
            with guarded(f"paper {label} stages"):
                stages = stage_latencies(built[label], 3 if quick else 10)
                raw[f"paper_{label}_stages_ms"] = stages
                rows += stage_rows(f"paper GPU {label}", stages)
    candidates = [lab for lab in built if "graph" in lab] or list(built)
    if not candidates:
        return rows, raw
    fastest = min(candidates, key=lambda lab: np.median(raw[f"paper_{lab}_ms"]))
    with guarded(f"paper {fastest} stages"):
        # the same generator (compiled models are compiled once); its stage graphs are new
        parts = graph_stages(built[fastest], 5 if quick else 20)
        raw[f"paper_{fastest}_stages_ms"] = parts
        for name, ms in parts.items():
            rows.append(_row(f"paper {fastest}, batch 1, {name} {'(own graph)' if cuda else ''}".rstrip(), ms, "ms"))
    if cuda:
        with guarded(f"paper {fastest} replay profile"):
            prof = kernel_profile(built[fastest], top=12)
            raw[f"paper_{fastest}_replay_profile"] = prof
            rows.append(_row(f"paper {fastest}: kernels in one beat's replay", prof["kernels"], "kernels",
                             f"{prof['kernel_ms']:.1f} ms of kernel time in {prof['wall_ms']:.1f} ms"))
    best_ms = float(np.median(raw[f"paper_{fastest}_ms"]))
    if "eager fp32" in built:
        speedup = np.median(raw["paper_eager fp32_ms"]) / best_ms
        rows.append(_row(f"paper speed-up, {fastest} vs eager fp32", speedup, "x", ">= 10 (issue 7)"))
    rows.append(_row(f"paper speed-up, {fastest} vs the paper's 6.4 s", 6400 / best_ms, "x", ">= 400"))
    lap_label = "graph bf16 + CuPy" if "graph bf16 + CuPy" in built else (None if cuda else "eager fp32")
    if lap_label:
        with guarded("paper overlapped replays"):
            lap = overlapped_replays(base, dict(variants)[lap_label], 5 if quick else 20)
            raw["paper_overlapped_replays"] = {"variant": lap_label, **lap}
            rows.append(_row(f"paper 2 batch-1 beats at once ({lap_label}), per beat p50", lap["together_p50_ms"], "ms",
                             f"alone {lap['alone_p50_ms']:.1f} ms"))
            rows.append(_row(f"paper 2 batch-1 beats at once ({lap_label}), beats/s", lap["beats_per_s"], "beats/s",
                             f"alone {lap['alone_beats_per_s']:.1f}"))
    for priming in ("image", "gap"):  # the other key layouts, same variant
        with guarded(f"paper {fastest} {priming}-primed"):
            xs = beat_latencies(built[fastest], 1, repeats, priming=priming)
            raw[f"paper_{fastest}_{priming}_ms"] = xs
            rows += _pct_rows(f"paper beat, GPU batch 1, {fastest}, {priming}-primed ({PRIMINGS[priming]})", xs)
    if "eager fp32" in built and "eager bf16" in built:
        with guarded("paper bf16 vs fp32"):
            report = precision_report(built["eager fp32"], built["eager bf16"], _requests(built["eager fp32"], 4))
            raw["paper_bf16_vs_fp32"] = report
            rows.append(_row("paper bf16 vs fp32 token agreement", report["token_agreement"], "fraction"))
            rows.append(_row("paper bf16 vs fp32 pixel MAE (end to end)", report["pixel_mae"], "grey levels"))
            rows.append(_row("paper bf16 vs fp32 pixel MAE (decoder alone)", report["decode_pixel_mae"], "grey levels"))
    best = built[fastest]
    for label in [lab for lab in built if lab != fastest]:  # free their buffers and graphs before the big batches
        del built[label]
    torch.cuda.empty_cache()
    for batch in BATCH_SIZES[1:] if cuda else (2,):
        with guarded(f"paper batch {batch}"):
            log.info("GPU: %s, batch %d", fastest, batch)
            xs = beat_latencies(best, batch, 5 if quick else 20)
            raw[f"paper_{fastest}_batch{batch}_ms"] = xs
            rows.append(_row(f"paper batch {batch}, {fastest}, per call p50", _pct(xs)[0], "ms"))
    with guarded("paper load test"):
        counts = ([16, 32, 48, 64] if quick else [16, 32, 40, 48, 56, 64, 96]) if cuda else [1, 2]
        held, trials = streams_held(best, counts, duration_s=3 * BEAT_S if quick else 8 * BEAT_S,
                                    policy=BatchPolicy(window_s=0.004))
        raw["paper_load_tests"] = trials
        rows.append(_row(f"paper {fastest}: 75-bpm streams held in real time", held, "streams", ">= 64 (issue 7)"))
        for trial in trials:
            rows.append(_row(f"paper p99 beat -> last frame published, {trial['streams']} streams", trial["p99_ms"], "ms",
                             "<= 30 at 64 (issue 7)" if trial["streams"] == 64 else f"mean batch {trial['mean_batch']:.1f}"))
    return rows, raw


def run(quick: bool, gpu_only: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """The stage's result; `progress` (from run.py) gets the result so far after each GPU section."""
    configure_backends("cpu")
    rows, raw = ([], {}) if gpu_only else cpu_part(quick)
    skipped: list[str] = []
    if torch.cuda.is_available():
        def report(gpu_rows: list[dict], gpu_raw: dict) -> None:
            progress({"rows": rows + gpu_rows, "raw": {**raw, **gpu_raw}, "skipped": skipped})

        gpu_rows, gpu_raw = gpu_part(quick, progress=report if progress is not None else None)
        rows += gpu_rows
        raw.update(gpu_raw)
    else:  # a note, not a row: a row's value is a measurement
        skipped.append("paper GPU rows: no CUDA device here; run benchmarks/gpu.sh on a GPU box")
    return {"rows": rows, "raw": raw, "skipped": skipped, "torch_threads": torch.get_num_threads()}


__all__ = ["run", "beat_latencies", "stage_latencies", "load_test", "streams_held"]
