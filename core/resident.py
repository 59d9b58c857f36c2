"""The resident generator: weights loaded once, static buffers per batch size, one call per batch.

    res = ResidentGenerator.from_generator(Generator.default(), precision="bf16", kernels="cupy", graphs=True)
    state = res.prime_loop(reference_clip, seed=device_seed)      # one DeviceState per device
    [result] = res.generate([BeatRequest(state, window, valid, rr, r_time, seed)])

A call runs the whole beat as one static-shape pipeline over a batch of devices:

    ECG encode + guidance contexts (cond and null rows, 2B)
    T MaskGIT steps: transformer on 2B rows, then sample + confidence + remask
    tokens -> LFQ codes -> tokenizer decode -> uint8 frames 1..F
    the last frame re-encoded causally: the next beat's prime tokens

Inputs live in `StaticBuffers` (one per (batch, leads)), so the same pipeline is eager on
CPU, eager on GPU, or one CUDA-graph replay (`graphs=True`, `kernels/cuda_graph.py`).
Sampling noise is counter-based (`kernels/reference_steps.py`): a device's tokens depend
on its own seed only, never on the batch it shared, so batching and padding change no
result. With graphs, batches are padded to the next of `BATCH_SIZES` by repeating a real
row (any valid input; padded rows are computed and dropped): few graphs, each captured
once. Eager runs use the exact batch size (padding would only add work).

Precision: "fp32", or "bf16": a copy of the weights stored in bf16, run under autocast;
matmuls, attention and the activations between them in bf16 (norms too: they
accumulate in fp32 inside the kernel, see `layers.LayerNorm`); sampling arithmetic in
fp32. `precision_report` measures what bf16 costs against fp32 on the same inputs:
token agreement and pixel error.
"""
from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ..kernels import reference_steps as ref
from .config import Preset
from .generator import Generator, beat_locked_clip
from .sampler import Schedule, make_schedule
from .tokenizer import from_uint8
from .transformer import KEY_LAYOUTS, Context, EcgFeatures, key_layout

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
PRECISIONS = ("fp32", "bf16")
# Which SDPA backend to try first ("auto": torch's own order). On an H200, single 2-row
# attention calls put flash and cuDNN within each other's run-to-run spread, yet the whole
# paper beat ran slower with flash first, at batch 1 and at 64 (docs/gpu.md): so "auto",
# and the others are there to measure on other GPUs.
ATTENTION_ORDER = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
ATTENTION_FIRST = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def padded_size(n: int, sizes: Sequence[int] = BATCH_SIZES) -> int:
    """The smallest allowed batch size that holds n rows."""
    for size in sorted(sizes):
        if size >= n:
            return size
    raise ValueError(f"batch of {n} is larger than the largest allowed size {max(sizes)}")


def configure_backends(device: torch.device | str, threads: int | None = None) -> None:
    """Process-wide torch settings for inference, chosen on purpose (call once at start-up).

    Not done in a constructor: these are global, so the program decides, not a library object."""
    device = torch.device(device)
    if device.type == "cuda":
        # fp32 must mean fp32: bf16 is judged against it, and TF32 would blur the comparison.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # bf16 GEMMs keep fp32 accumulation: logits feed an argmax and a ranking.
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        # all shapes are static per graph, so an autotuned choice is made once (no convs today).
        torch.backends.cudnn.benchmark = True
    if threads is not None:
        # On a small CPU one thread per core; more threads than cores only contend.
        torch.set_num_threads(threads)


def _weights_in(module: torch.nn.Module | None, precision: str) -> torch.nn.Module | None:
    """The module itself for fp32 (None stays None); for bf16 a copy whose parameters are stored in bf16.

    Under autocast, fp32 weights are cast again by every linear layer of every decode
    step, because the autocast cache does not serve inference mode (measured on the
    paper preset: about 1,900 cast kernels and 4 ms of a 33 ms beat on an H200). Stored
    in bf16 they are cast never; buffers (step phases, masks) stay as they are. A copy:
    the generator handed in keeps its fp32 weights for other users."""
    if precision == "fp32" or module is None:
        return module
    copy = _copy.deepcopy(module)
    for param in copy.parameters():
        param.data = param.data.to(torch.bfloat16)
    return copy


# per-device state and requests


@dataclass
class DeviceState:
    """What a device carries from beat to beat (tensors on the generator's device)."""

    prime: Tensor       # (h·w,) tokens of the last emitted frame
    ref_ids: Tensor     # (N,) tokens of the patient's reference loop (zeros when absent)
    ref_valid: bool
    seed: int


@dataclass
class BeatRequest:
    state: DeviceState
    window: np.ndarray  # (L, S) float32 ECG at the encoder's rate, from core.beat_window
    valid: np.ndarray   # (S,) or (L, S) bool
    rr: float           # seconds
    r_time: float       # seconds, ECG time of this beat's R peak
    seed: int           # this beat's sampling seed


@dataclass
class BeatResult:
    frames: np.ndarray  # (F, H, W) uint8
    times: np.ndarray   # (F,) seconds
    tokens: np.ndarray  # (N,) the clip's token ids (prime step included)


@dataclass
class StaticBuffers:
    """Fixed-address inputs and outputs of one (batch, leads) pipeline."""

    window: Tensor      # (B, L, S) float32
    valid: Tensor       # (B, L, S) bool
    lead_ids: Tensor    # (B, L) long
    rr: Tensor          # (B,) float32
    ref_ids: Tensor     # (B, N) long
    ref_valid: Tensor   # (B,) bool
    prime: Tensor       # (B, h·w) long
    seeds: Tensor       # (B,) long
    drop: Tensor        # (2B,) bool: False for the conditional rows, True for the null rows
    ids: Tensor         # (B, N) long: working tokens, the clip's tokens at the end
    unknown: Tensor     # (B, N) bool
    sampled: Tensor     # (B, N) long (kernel scratch)
    conf: Tensor        # (B, N) float32 (kernel scratch)
    codes: Tensor       # (B, N, K) float32
    frames: Tensor      # (B, F, H, W) uint8
    next_prime: Tensor  # (B, h·w) long
    positions: list[Tensor]  # per step (B, U_s) long: the unknown tokens (CuPy path, else empty; [0] is fixed)

    @property
    def batch(self) -> int:
        return self.window.shape[0]


class StageTimer:
    """Wall time per named stage; `sync` (e.g. torch.cuda.synchronize) runs before each reading."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.times: dict[str, float] = {}
        self._last = 0.0

    def start(self) -> None:
        if self.sync:
            self.sync()
        self.times = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self.sync:
            self.sync()
        now = time.perf_counter()
        self.times[name] = now - self._last
        self._last = now


class ResidentGenerator:
    """Batched, static-shape beat generation over one resident copy of the weights."""

    def __init__(
        self,
        generator: Generator,
        precision: str = "fp32",
        kernels: str = "torch",
        graphs: bool = False,
        compile: bool = False,
        pad: bool | None = None,
        attention: str = "auto",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if kernels not in ("torch", "cupy"):
            raise ValueError(f"kernels must be 'torch' or 'cupy', got {kernels!r}")
        self.device = generator.device
        if (kernels == "cupy" or graphs) and self.device.type != "cuda":
            raise ValueError("CuPy kernels and CUDA graphs need the generator on a CUDA device")
        if attention not in ATTENTION_FIRST:
            raise ValueError(f"attention must be one of {tuple(ATTENTION_FIRST)}, got {attention!r}")
        self.attention = attention
        self.preset: Preset = generator.preset
        self.name = generator.name
        self.tokenizer = _weights_in(generator.tokenizer, precision)
        self.ecg_encoder = _weights_in(generator.ecg_encoder, precision)
        self.transformer = _weights_in(generator.transformer, precision)
        self.critic = _weights_in(generator.critic, precision)
        # The beat's models, optionally compiled (off by default): the transformer body and,
        # on CUDA, the ECG encoder and the tokenizer's decode and encode too (on an H200 they
        # took 1.4 ms more off a 22.8 ms beat; on 2 CPU cores compiling them made the tiny
        # beat slower, 95 → 104 ms, while the body alone gains there). Dynamic shapes: the
        # rows sampled shrink every step and the batch varies, so one compile serves them all
        # (the body compiles once per key layout: their graphs differ). With graphs, the
        # warm-up before capture compiles, and the capture records the compiled kernels:
        # Inductor's fusions inside our graph, not its own graphs. Priming runs uncompiled.
        whole_beat = compile and self.device.type == "cuda"
        self.body = torch.compile(self.transformer.transformer, dynamic=True) if compile else self.transformer.transformer
        self._encode_ecg = torch.compile(self.ecg_encoder.encode, dynamic=True) if whole_beat else self.ecg_encoder.encode
        self._decode_video = torch.compile(self.tokenizer.decode, dynamic=True) if whole_beat else self.tokenizer.decode
        self._encode_video = torch.compile(self.tokenizer.encode, dynamic=True) if whole_beat else self.tokenizer.encode
        self.precision = precision
        self.kernel_kind = kernels
        self.kernels = None
        if kernels == "cupy":
            from ..kernels.cupy_kernels import FusedKernels

            self.kernels = FusedKernels(self.device)
        tcfg = self.preset.transformer
        model = self.transformer
        generated = model.num_tokens - model.prime_tokens
        on_host = make_schedule(tcfg.steps, generated, tcfg.temperature, tcfg.confidence_noise, tcfg.cfg_scale)
        self.schedule = Schedule(*(t.to(self.device) for t in on_host))
        # Tokens still unknown when step s starts: every token but the prime at step 0, then
        # exactly the n_masked of the step before (they are static: shapes, not values).
        self.unknown_counts = [generated, *on_host.n_masked[:-1].tolist()]
        self.graphs = None
        if graphs:
            from ..kernels.cuda_graph import GraphCache

            self.graphs = GraphCache(self._capturable)
        # Padding to BATCH_SIZES keeps the number of captured graphs small; without graphs
        # it would only add work, so by default eager runs use the exact batch size.
        self.pad = graphs if pad is None else pad
        self._buffers: dict[tuple[int, int], StaticBuffers] = {}
        # One thread at a time on the device's models and buffers: a batch size's first
        # beat captures its graph, and during a capture another thread's GPU work (a
        # device primed on a worker thread: a tokenizer encode, allocations) is an error
        # or ends up in the graph. Priming is rare and short, so it simply waits its turn.
        self._lock = threading.Lock()

    @classmethod
    def from_generator(cls, generator: Generator, **options: object) -> "ResidentGenerator":
        return cls(generator, **options)  # type: ignore[arg-type]

    def set_sampling(self, temperature: float, confidence_noise: float, cfg_scale: float) -> None:
        """New sampling settings, written in place into the schedule tensors, so captured
        graphs replay with them (the step count and the masking counts are shapes: fixed).
        Waits for a batch in flight, so no beat mixes two settings."""
        model = self.transformer
        new = make_schedule(self.steps, model.num_tokens - model.prime_tokens, temperature, confidence_noise, cfg_scale)
        with self._lock, torch.inference_mode():
            self.schedule.temperature.copy_(new.temperature)
            self.schedule.noise.copy_(new.noise)
            self.schedule.cond_scale.copy_(new.cond_scale)

    # geometry

    @property
    def frames_per_beat(self) -> int:
        return self.preset.tokenizer.frames - 1

    @property
    def steps(self) -> int:
        return int(self.schedule.n_masked.shape[0])

    def numerics(self) -> contextlib.AbstractContextManager:
        """What every model call runs under: bf16 autocast, and the attention backend preference."""
        stack = contextlib.ExitStack()
        if self.precision == "bf16":
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        first = ATTENTION_FIRST[self.attention]
        if first is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            order = [getattr(SDPBackend, name) for name in (first, *(b for b in ATTENTION_ORDER if b != first))]
            # a preference, not a restriction: a backend that refuses a shape or mask falls through
            stack.enter_context(sdpa_kernel(order, set_priority=True))
        return stack

    def buffers(self, batch: int, leads: int) -> StaticBuffers:
        """The static buffers of a (batch, leads) pipeline, allocated on first use."""
        key = (batch, leads)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self._allocate(batch, leads)
        return buf

    def _allocate(self, b: int, leads: int) -> StaticBuffers:
        dev = self.device
        tok, ecg = self.preset.tokenizer, self.preset.ecg
        n, hw, s = self.transformer.num_tokens, self.transformer.prime_tokens, ecg.window_samples
        size = tok.image_size
        long = dict(dtype=torch.long, device=dev)
        return StaticBuffers(
            window=torch.zeros(b, leads, s, device=dev),
            valid=torch.ones(b, leads, s, dtype=torch.bool, device=dev),
            lead_ids=torch.arange(leads, device=dev).repeat(b, 1),
            rr=torch.ones(b, device=dev),
            ref_ids=torch.zeros(b, n, **long),
            ref_valid=torch.zeros(b, dtype=torch.bool, device=dev),
            prime=torch.zeros(b, hw, **long),
            seeds=torch.zeros(b, **long),
            drop=torch.arange(2 * b, device=dev) >= b,
            ids=torch.zeros(b, n, **long),
            unknown=torch.zeros(b, n, dtype=torch.bool, device=dev),
            sampled=torch.zeros(b, n, **long),
            conf=torch.zeros(b, n, device=dev),
            codes=torch.zeros(b, n, tok.lfq_bits, device=dev),
            frames=torch.zeros(b, tok.frames - 1, size, size, dtype=torch.uint8, device=dev),
            next_prime=torch.zeros(b, hw, **long),
            # CuPy path only: step 0's unknown tokens are every token after the prime; the remask
            # kernel writes the rest (the torch path sorts the unknown mask instead)
            positions=[torch.arange(hw, n, device=dev).repeat(b, 1), *(torch.zeros(b, u, **long) for u in self.unknown_counts[1:])]
            if self.kernels is not None else [],
        )

    # the pipeline (static shapes, no host sync: the same code runs eager or captured)

    def contexts(self, buf: StaticBuffers, layout: str = "masked") -> tuple[Context, Context | None]:
        """Guidance context (2B: conditional rows, then null rows) and the critic's context.

        Same as `MaskedTransformer.guidance_context`, with the drop mask taken from a
        device buffer (that method builds it on the host, which a capture cannot do).
        `layout` is the batch's key layout (`key_layout`, decided on the host)."""
        ecg = EcgFeatures(*self._encode_ecg(buf.window, buf.valid, buf.lead_ids))
        ecg2 = EcgFeatures(*(torch.cat([x, x]) for x in ecg))

        def two(x: Tensor) -> Tensor:
            return torch.cat([x, x])

        # keys and values once per beat, not once per decode step
        context2 = self.transformer.with_keys_values(self.transformer.condition(
            ecg2, two(buf.rr), two(buf.ref_ids), two(buf.ref_valid), buf.drop, layout=layout
        ))
        critic_context = None
        if self.critic is not None:
            critic_context = self.critic.with_keys_values(
                self.critic.condition(ecg, buf.rr, buf.ref_ids, buf.ref_valid, layout=layout)
            )
        return context2, critic_context

    def decode_step(
        self, buf: StaticBuffers, step: int, ids: Tensor, unknown: Tensor, context2: Context, critic_context: Context | None
    ) -> tuple[Tensor, Tensor]:
        """One MaskGIT step: transformer on the CFG pair, then sample + confidence + remask.

        Only the tokens still unknown are sampled, so the last block and the output
        projection run on those alone (`Transformer.forward(rows=)`). Their count at each
        step is static (`unknown_counts`): over a decode that skips 40 % of the projection
        and sampling work and half of the last block (tiny: 320 → 82 of 384 tokens).
        Which they are: the CuPy remask, which sorts anyway, writes the next step's into
        `buf.positions` (least confident first); the torch path sorts the unknown mask."""
        sch = self.schedule
        model = self.transformer
        # the CuPy remask wrote this step's unknown tokens; the torch path finds them by sorting
        positions = buf.positions[step] if self.kernels is not None else self.unknown_positions(unknown, step)
        logits2 = self.unknown_logits(ids, positions, context2)
        if self.kernels is not None:
            self.kernels.sample_confidence(
                logits2, ids, unknown, buf.seeds, sch.cond_scale, sch.temperature, sch.noise, step,
                buf.sampled, buf.conf, positions=positions,
            )
            sampled, conf = buf.sampled, buf.conf
        else:
            picked, picked_conf, _ = ref.sample_confidence(
                logits2, ids, unknown, buf.seeds, sch.cond_scale, sch.temperature[step], sch.noise[step], step, positions
            )
            sampled = ids.scatter(1, positions, picked)
            conf = torch.full(ids.shape, math.inf, device=ids.device).scatter(1, positions, picked_conf)
        if self.critic is not None:  # fixed per generator, not a branch on a tensor value
            critic_logits = self.critic(sampled, critic_context)
            conf = ref.critic_confidence(critic_logits, unknown, buf.seeds, sch.noise[step], step)
        if self.kernels is not None:
            following = buf.positions[step + 1] if step + 1 < self.steps else None
            self.kernels.remask(conf, sampled, sch.n_masked, step, model.mask_id, ids, unknown, following)  # in place
            return ids, unknown
        return ref.remask(conf, sampled, sch.n_masked[step], model.mask_id)

    def unknown_positions(self, unknown: Tensor, step: int) -> Tensor:
        """(B, U) positions of the tokens unknown when `step` starts, ascending; U is static."""
        # a stable sort puts the zeros of ~unknown (the unknown tokens) first, in order
        return (~unknown).to(torch.uint8).argsort(dim=-1, stable=True)[:, : self.unknown_counts[step]]

    def unknown_logits(self, ids: Tensor, positions: Tensor, context2: Context) -> Tensor:
        """The CFG pair's logits (2B, U, V) at `positions` (B, U): `MaskedTransformer.forward`
        on the pair, through `self.body` (compiled when asked). Both halves of the pair hold
        the same tokens, so they are embedded once and share the first self-attention
        (`Transformer.forward(copies=2)`)."""
        model = self.transformer
        hidden = self.body(
            model.embed_tokens(ids), context=context2.tokens, context_mask=context2.mask,
            cross_kv=context2.kv, rows=torch.cat([positions, positions]), copies=2,
        )
        return model.to_out(hidden)

    def decode_video(self, buf: StaticBuffers, ids: Tensor) -> None:
        """Tokens -> codes -> decoder -> uint8 frames 1..F into `buf.frames`."""
        b = ids.shape[0]
        t, h, w = self.transformer.grid
        bits = self.preset.tokenizer.lfq_bits
        if self.kernels is not None:
            self.kernels.lfq_codes(ids, bits, buf.codes)
            codes = buf.codes
        else:
            codes = ref.lfq_codes(ids, bits)
        video = self._decode_video(codes.view(b, t, h, w, bits))
        if self.kernels is not None:
            self.kernels.frames_uint8(video.contiguous(), buf.frames)
        else:
            buf.frames.copy_(ref.frames_uint8(video))

    def reprime(self, buf: StaticBuffers) -> None:
        """The last emitted frame, re-encoded causally: the next beat's prime tokens."""
        last = from_uint8(buf.frames[:, -1:])  # (B, 1, 1, H, W)
        buf.next_prime.copy_(self._encode_video(last).flatten(1))

    def pipeline(self, buf: StaticBuffers, timer: StageTimer | None = None, layout: str = "masked") -> None:
        """One beat for every row of `buf`: reads its inputs, writes ids, frames, next_prime.

        `layout` must hold for the rows in `buf` (see `key_layout`)."""
        with self.numerics():
            context2, critic_context = self.contexts(buf, layout)
            if timer:
                timer.mark("ecg_encode")
            self.decode(buf, context2, critic_context, timer)
            self.finish(buf, timer)

    def decode(self, buf: StaticBuffers, context2: Context, critic_context: Context | None, timer: StageTimer | None = None) -> None:
        """The T MaskGIT steps from the prime frame: `buf.ids` holds the clip's tokens after."""
        model = self.transformer
        hw = model.prime_tokens
        buf.ids[:, :hw] = buf.prime
        buf.ids[:, hw:] = model.mask_id
        buf.unknown.copy_(buf.ids == model.mask_id)
        ids, unknown = buf.ids, buf.unknown
        for step in range(self.steps):
            ids, unknown = self.decode_step(buf, step, ids, unknown, context2, critic_context)
            if timer:
                timer.mark(f"decode_step_{step}")
        if ids is not buf.ids:  # the torch path makes new tensors each step
            buf.ids.copy_(ids)
            buf.unknown.copy_(unknown)

    def finish(self, buf: StaticBuffers, timer: StageTimer | None = None) -> None:
        """Frames from `buf.ids`, and the next beat's prime tokens from the last of them."""
        self.decode_video(buf, buf.ids)
        if timer:
            timer.mark("tokenizer_decode")
        self.reprime(buf)
        if timer:
            timer.mark("reprime")

    def _capturable(self, key: object) -> Callable[[], None]:
        batch, leads, layout = key  # type: ignore[misc]
        buf = self.buffers(batch, leads)

        def run() -> None:
            self.pipeline(buf, layout=layout)

        return run

    @torch.inference_mode()
    def run(self, buf: StaticBuffers, timer: StageTimer | None = None, layout: str = "masked") -> None:
        """Eager pipeline, or the graph replay when graphs are on (a timer forces eager).

        One graph per (batch, leads, layout): the layouts differ in shapes and kernels."""
        if self.graphs is not None and timer is None:
            self.graphs.get((buf.batch, buf.window.shape[1], layout)).replay()
        else:
            self.pipeline(buf, timer, layout)

    def drop_graphs(self) -> None:
        """Forget every captured graph, so their memory pools can return to the allocator;
        the next beat of each (batch, leads, layout) captures again. Waits for a batch in
        flight: its graph's pool holds that beat's tensors."""
        with self._lock:
            if self.graphs is not None:
                from ..kernels.cuda_graph import GraphCache

                self.graphs = GraphCache(self._capturable)

    @torch.inference_mode()
    def warm_up(
        self, batch_sizes: Sequence[int] = (1,), leads: int = 1, layouts: Sequence[str] = KEY_LAYOUTS
    ) -> None:
        """Allocate buffers (and capture graphs) for these batch sizes and key layouts before
        the first beat, so no beat waits for a capture."""
        with self._lock:
            for b in batch_sizes:
                buf = self.buffers(b, leads)
                for layout in layouts:
                    if self.graphs is not None:
                        self.graphs.get((b, leads, layout))
                    else:
                        self.pipeline(buf, layout=layout)

    # priming

    def _video(self, frames: np.ndarray) -> Tensor:
        size = self.preset.tokenizer.image_size
        arr = np.asarray(frames)
        if arr.dtype != np.uint8 or arr.shape[-2:] != (size, size):
            raise ValueError(f"expected uint8 frames of {size}x{size}, got {arr.dtype} {arr.shape}")
        return from_uint8(torch.from_numpy(np.ascontiguousarray(arr))).to(self.device)

    @torch.inference_mode()
    def prime_loop(self, frames: np.ndarray, seed: int, beat_locked: bool = True) -> DeviceState:
        """A device primed with a reference loop of its patient (uint8 T×H×W); see Generator.prime_loop."""
        frames = np.asarray(frames)
        size = self.preset.tokenizer.image_size
        if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[1:] != (size, size) or len(frames) < 2:
            # checked before any resampling, which would cast a float loop to near-black uint8
            raise ValueError(f"a reference loop is uint8 frames of {size}x{size}, at least 2, got {frames.dtype} {frames.shape}")
        if not beat_locked:
            frames = beat_locked_clip(frames, self.preset.tokenizer.frames)
        if frames.ndim != 3 or frames.shape[0] != self.preset.tokenizer.frames:
            raise ValueError(f"a beat-locked reference loop has {self.preset.tokenizer.frames} frames, got {frames.shape}")
        video = self._video(frames)
        with self._lock, self.numerics():
            ref_ids = self.tokenizer.encode(video).flatten(1)[0]
            prime = self.tokenizer.encode(video[:, :, -1:]).flatten(1)[0]
        return DeviceState(prime=prime, ref_ids=ref_ids, ref_valid=True, seed=int(seed))

    @torch.inference_mode()
    def prime_image(self, frame: np.ndarray, seed: int) -> DeviceState:
        """A device primed with one frame (uint8 H×W) and no reference loop."""
        video = self._video(np.asarray(frame)[None])
        with self._lock, self.numerics():
            prime = self.tokenizer.encode(video).flatten(1)[0]
        n = self.transformer.num_tokens
        return DeviceState(prime=prime, ref_ids=torch.zeros(n, dtype=torch.long, device=self.device), ref_valid=False, seed=int(seed))

    # batched generation

    @torch.inference_mode()
    def fill(self, buf: StaticBuffers, requests: Sequence[BeatRequest]) -> None:
        """Copy requests into the static inputs; rows past len(requests) repeat the first."""
        b = buf.batch
        rows = [requests[i] if i < len(requests) else requests[0] for i in range(b)]
        leads, samples = buf.window.shape[1:]
        window = np.zeros((b, leads, samples), np.float32)
        valid = np.zeros((b, leads, samples), bool)
        for i, r in enumerate(rows):
            w = np.asarray(r.window, np.float32).reshape(leads, samples)
            # a NaN is missing data, as in `Generator.generate_beat`: one would poison its lead's normalisation
            finite = np.isfinite(w)
            window[i] = np.where(finite, w, 0.0)
            valid[i] = np.broadcast_to(np.asarray(r.valid, bool), (leads, samples)) & finite
        buf.window.copy_(torch.from_numpy(window))
        buf.valid.copy_(torch.from_numpy(valid))
        buf.rr.copy_(torch.tensor([float(r.rr) for r in rows]))
        buf.seeds.copy_(torch.tensor([int(r.seed) for r in rows], dtype=torch.long))
        buf.ref_valid.copy_(torch.tensor([bool(r.state.ref_valid) for r in rows]))
        buf.prime.copy_(torch.stack([r.state.prime for r in rows]))
        buf.ref_ids.copy_(torch.stack([r.state.ref_ids for r in rows]))

    def generate(self, requests: Sequence[BeatRequest]) -> list[BeatResult]:
        """One beat for each request (devices must differ; lead counts must match), one batched call.

        Each request's state moves on to its new prime tokens."""
        if not requests:
            return []
        samples = self.preset.ecg.window_samples
        leads = np.asarray(requests[0].window).reshape(-1, samples).shape[0]
        for r in requests:
            if not (r.rr > 0 and math.isfinite(r.rr)):
                raise ValueError(f"rr must be positive and finite, got {r.rr}")
            # a window of fewer leads would be broadcast over the batch's leads
            if np.asarray(r.window).reshape(-1, samples).shape[0] != leads:
                raise ValueError(f"every window of a batch needs the same number of leads ({leads}), got {np.shape(r.window)}")
        # padded rows repeat requests[0], so the real rows decide the layout; a NaN is not valid (`fill`)
        whole = [bool(np.all(r.valid)) and bool(np.isfinite(np.asarray(r.window, np.float32)).all()) for r in requests]
        layout = key_layout([bool(r.state.ref_valid) for r in requests], whole)
        with self._lock, torch.inference_mode():
            size = padded_size(len(requests)) if self.pad else len(requests)
            buf = self.buffers(size, leads)
            self.fill(buf, requests)
            self.run(buf, layout=layout)
            # the beat's one host sync; copies, because on CPU .cpu() would alias the static buffers
            frames = buf.frames[: len(requests)].to("cpu", copy=True).numpy()
            tokens = buf.ids[: len(requests)].to("cpu", copy=True).numpy()
            count = self.frames_per_beat
            results = []
            for i, r in enumerate(requests):
                r.state.prime = buf.next_prime[i].clone()
                times = r.r_time + np.arange(count, dtype=np.float64) * r.rr / count
                results.append(BeatResult(frames=frames[i], times=times, tokens=tokens[i]))
        return results

    @torch.inference_mode()
    def decode_tokens(self, tokens: np.ndarray | Tensor) -> np.ndarray:
        """Frames 1..F (B, F, H, W) uint8 of clips given as tokens (B, N): the tokenizer alone."""
        ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
        with self._lock, self.numerics():  # the static buffers `generate` uses too
            buf = self.buffers(padded_size(ids.shape[0]) if self.pad else ids.shape[0], 1)
            self.decode_video(buf, torch.cat([ids, ids[:1].expand(buf.batch - ids.shape[0], -1)]))
            return buf.frames[: ids.shape[0]].to("cpu", copy=True).numpy()


def clone_states(requests: Sequence[BeatRequest]) -> list[BeatRequest]:
    """Requests with their own copies of the device states (a run that must not move them on)."""
    return [
        dataclasses.replace(r, state=dataclasses.replace(r.state, prime=r.state.prime.clone(), ref_ids=r.state.ref_ids.clone()))
        for r in requests
    ]


def precision_report(reference: ResidentGenerator, candidate: ResidentGenerator, requests: Sequence[BeatRequest]) -> dict[str, float]:
    """What `candidate` (e.g. bf16) costs against `reference` (fp32) on the same inputs and seeds.

    token_agreement: fraction of generated tokens equal (sampling is chaotic: one flipped
    token changes what follows, so this is a strict measure); pixel_mae / pixel_max: frame
    error in grey levels, end to end; decode_pixel_mae: the candidate's tokenizer decoding
    the reference's tokens (the decoder's own precision error, without sampling)."""
    hw = reference.transformer.prime_tokens
    a = reference.generate(clone_states(requests))
    b = candidate.generate(clone_states(requests))
    ta = np.stack([r.tokens[hw:] for r in a])
    tb = np.stack([r.tokens[hw:] for r in b])
    fa = np.stack([r.frames for r in a]).astype(np.int16)
    fb = np.stack([r.frames for r in b]).astype(np.int16)
    decoded = candidate.decode_tokens(np.stack([r.tokens for r in a])).astype(np.int16)
    return {
        "token_agreement": float((ta == tb).mean()),
        "pixel_mae": float(np.abs(fa - fb).mean()),
        "pixel_max": float(np.abs(fa - fb).max()),
        "decode_pixel_mae": float(np.abs(decoded - fa).mean()),
        "decode_pixel_max": float(np.abs(decoded - fa).max()),
    }


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch threads, restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = [
    "BATCH_SIZES", "BeatRequest", "BeatResult", "DeviceState", "ResidentGenerator", "StageTimer", "StaticBuffers",
    "configure_backends", "padded_size", "precision_report", "threads",
]
