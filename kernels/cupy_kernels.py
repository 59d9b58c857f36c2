"""CuPy RawKernels for the fused decode steps (GPU only; references in `kernels/reference_steps.py`).

- `sample_confidence`: one block per token reads the conditional and null logits once and
  does classifier-free guidance, Gumbel-max sampling (hash noise, see reference_steps),
  an online log-softmax for the sampled token's log-probability and the annealed
  confidence noise. Known tokens skip their logits entirely; given the positions of the
  unknown tokens, it reads logits computed for those alone.
- `remask`: one block per row sorts (confidence, position) in shared memory (bitonic,
  N padded to a power of two: 384 -> 512, 1536 -> 2048) and re-masks the first n_t, where
  n_t is read from the precomputed schedule in device memory; given a buffer, it also
  writes the re-masked tokens' positions, the next step's unknown tokens. Ranking needs
  every token of a row, so it is a second launch; inside a CUDA graph the two cost no
  launch overhead.
- `lfq_codes`: token indices -> ±scale code vectors (most significant bit first).
- `frames_uint8`: decoder output -> clipped, rounded uint8 frames 1..T-1, ready to publish.

How they meet CUDA graphs: the module is compiled and loaded in the constructor (warm-up,
before any capture); launches go on torch's current stream through
`cupy.ExternalStream`, so a capture on that stream records them; arguments are raw device
pointers of torch tensors (zero copy, no CuPy allocation, no pointer queries, and bf16
needs no CuPy dtype: it is read as its 16 bits); per-step values (temperature, noise,
n_t, guidance scale) and seeds are read from device tensors, so replays pick up values
written in place. Nothing here syncs with the host.

Importing this module never imports CuPy; constructing `FusedKernels` does.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = r"""
#define FULL_MASK 0xffffffffu
#define TOKEN_THREADS 128

__device__ __forceinline__ unsigned int lowbias32(unsigned int x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

__device__ __forceinline__ unsigned int row_key(long long seed, int step, int stream) {
    unsigned int lo = (unsigned int)(seed & 0xffffffffLL);
    unsigned int hi = (unsigned int)((seed >> 32) & 0xffffffffLL);
    unsigned int tag = lowbias32((unsigned int)(step * 2 + stream + 1));
    return lowbias32(lo ^ lowbias32(hi ^ tag));
}

__device__ __forceinline__ float gumbel(unsigned int bits) {
    // u in (0, 1), exact in float32; -log(-log(u)) as torch computes it
    float u = __fmul_rn(__fadd_rn((float)(bits >> 8), 0.5f), 5.9604644775390625e-08f);
    return -logf(-logf(u));
}

__device__ __forceinline__ float load(const void* p, long long i, int is_bf16) {
    if (is_bf16) {
        unsigned short h = ((const unsigned short*)p)[i];
        return __uint_as_float(((unsigned int)h) << 16);
    }
    return ((const float*)p)[i];
}

// One thread's share of a token: every `stride`-th vocabulary entry from `first`. Tracks
// the online log-sum-exp (max m, scaled sum total) of the guided logits and the Gumbel-max argmax.
struct Partial { float m, total, best, best_g; int best_v; };

__device__ __forceinline__ Partial lane_partial(
    const void* logits2, int is_bf16, long long cbase, long long nbase, float s, float tau,
    unsigned int key, int n, int V, int first, int stride)
{
    Partial p;
    p.m = -__int_as_float(0x7f800000); p.total = 0.f;
    p.best = -__int_as_float(0x7f800000); p.best_g = 0.f; p.best_v = 0x7fffffff;
    for (int v = first; v < V; v += stride) {
        float c = load(logits2, cbase + v, is_bf16);
        float u = load(logits2, nbase + v, is_bf16);
        float g = __fadd_rn(u, __fmul_rn(s, __fsub_rn(c, u)));      // null + s * (cond - null)
        if (g > p.m) { p.total = p.total * expf(p.m - g) + 1.f; p.m = g; }
        else { p.total += expf(g - p.m); }
        unsigned int bits = lowbias32(key ^ (unsigned int)(n * V + v));
        float score = __fadd_rn(g, __fmul_rn(tau, gumbel(bits)));    // g + tau * Gumbel
        if (score > p.best || p.best_v == 0x7fffffff) { p.best = score; p.best_v = v; p.best_g = g; }
    }
    return p;
}

// Combine two lanes' partials; ties of the argmax go to the lower index (torch.argmax).
__device__ __forceinline__ Partial merge(Partial a, Partial b) {
    Partial r;
    r.m = fmaxf(a.m, b.m);
    r.total = ((a.total > 0.f) ? a.total * expf(a.m - r.m) : 0.f) + ((b.total > 0.f) ? b.total * expf(b.m - r.m) : 0.f);
    bool take_b = b.best > a.best || (b.best == a.best && b.best_v < a.best_v);
    r.best = take_b ? b.best : a.best;
    r.best_g = take_b ? b.best_g : a.best_g;
    r.best_v = take_b ? b.best_v : a.best_v;
    return r;
}

// The token's outputs from the merged partial: its id and log p(id) + nu * Gumbel.
__device__ __forceinline__ void finish(Partial p, long long seed, int step, int n, float nu, long long* sampled, float* conf, long long t) {
    float logp = p.best_g - (p.m + logf(p.total));
    float gc = gumbel(lowbias32(row_key(seed, step, 1) ^ (unsigned int)n));
    sampled[t] = (long long)p.best_v;
    conf[t] = __fadd_rn(logp, __fmul_rn(nu, gc));
}

// Listed token `w` of logits2 (2B, U, V): its row *b, position *n; returns its index in (B, N).
// Without positions every token is listed in order (U == N).
__device__ __forceinline__ long long listed_token(long long w, const long long* positions, int U, int N, int* b, int* n) {
    *b = (int)(w / U);
    *n = positions ? (int)positions[w] : (int)(w - (long long)(*b) * U);
    return (long long)(*b) * N + *n;
}

// Known tokens keep their id with +inf confidence (never re-masked); grid-stride over (B, N).
__device__ __forceinline__ void keep_known(const long long* ids, const unsigned char* unknown, long long total,
                                           long long first, long long stride, long long* sampled, float* conf) {
    for (long long t = first; t < total; t += stride)
        if (!unknown[t]) { sampled[t] = ids[t]; conf[t] = __int_as_float(0x7f800000); }
}

// Merge the partials of a warp's 32 threads (xor butterfly: every lane ends with the total).
__device__ __forceinline__ Partial warp_merge(Partial p) {
    for (int off = 16; off > 0; off >>= 1) {
        Partial q;
        q.m = __shfl_xor_sync(FULL_MASK, p.m, off);
        q.total = __shfl_xor_sync(FULL_MASK, p.total, off);
        q.best = __shfl_xor_sync(FULL_MASK, p.best, off);
        q.best_g = __shfl_xor_sync(FULL_MASK, p.best_g, off);
        q.best_v = __shfl_xor_sync(FULL_MASK, p.best_v, off);
        p = merge(p, q);
    }
    return p;
}

// One block of TOKEN_THREADS per listed token: a warp per token left late decode steps, with
// few tokens unknown, latency-bound (one warp walking 8192 logits alone; measured 140 us a
// step on an H200). Each thread takes every TOKEN_THREADS-th logit; warps merge by
// butterfly, then thread 0 merges the warps in order.
extern "C" __global__ void sample_confidence(
    const void* logits2, int is_bf16, const long long* ids, const unsigned char* unknown,
    const long long* seeds, const float* cond_scale, const float* temperature, const float* noise,
    int step, int B, int N, int V, const long long* positions, int U, long long* sampled, float* conf)
{
    // logits2 is (2B, U, V): every token (positions == 0, U == N), or the U tokens of each
    // row listed in positions (B, U), which must list every unknown token of its row.
    __shared__ Partial warp_total[TOKEN_THREADS / 32];
    keep_known(ids, unknown, (long long)B * N, (long long)blockIdx.x * blockDim.x + threadIdx.x,
               (long long)gridDim.x * blockDim.x, sampled, conf);
    long long w = blockIdx.x;                      // the listed token of this block
    if (w >= (long long)B * U) return;             // whole blocks leave together
    int b, n;
    long long t = listed_token(w, positions, U, N, &b, &n);
    if (!unknown[t]) return;                       // known: keep_known wrote it
    long long seed = seeds[b];
    Partial p = lane_partial(logits2, is_bf16, w * V, (w + (long long)B * U) * V, cond_scale[0], temperature[step],
                             row_key(seed, step, 0), n, V, threadIdx.x, TOKEN_THREADS);
    p = warp_merge(p);
    if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x >> 5] = p;
    __syncthreads();
    if (threadIdx.x == 0) {
        Partial total = warp_total[0];
        for (int i = 1; i < TOKEN_THREADS / 32; ++i) total = merge(total, warp_total[i]);
        finish(total, seed, step, n, noise[step], sampled, conf, t);
    }
}

extern "C" __global__ void remask(
    const float* conf, const long long* sampled, const long long* n_masked, int step,
    int N, int NP, long long mask_id, long long* ids_out, unsigned char* unknown_out, long long* positions_out)
{
    // positions_out (B, n_masked[step]), when given: the re-masked tokens' positions, least
    // confident first: the next step's unknown tokens, with no second sort to find them.
    extern __shared__ unsigned char smem[];
    float* key = (float*)smem;
    int* pos = (int*)(key + NP);
    int b = blockIdx.x;
    for (int i = threadIdx.x; i < NP; i += blockDim.x) {
        key[i] = (i < N) ? conf[(long long)b * N + i] : __int_as_float(0x7f800000);
        pos[i] = i;
    }
    __syncthreads();
    // bitonic sort, ascending by (confidence, position): a stable rank, ties broken by position
    for (int k = 2; k <= NP; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < NP; i += blockDim.x) {
                int l = i ^ j;
                if (l > i) {
                    float ki = key[i], kl = key[l];
                    int pi = pos[i], pl = pos[l];
                    bool greater = (ki > kl) || (ki == kl && pi > pl);
                    bool ascending = (i & k) == 0;
                    if (greater == ascending) { key[i] = kl; key[l] = ki; pos[i] = pl; pos[l] = pi; }
                }
            }
            __syncthreads();
        }
    }
    long long count = n_masked[step];
    for (int r = threadIdx.x; r < NP; r += blockDim.x) {
        int i = pos[r];
        if (i < N) {
            long long t = (long long)b * N + i;
            bool again = r < count;
            ids_out[t] = again ? mask_id : sampled[t];
            unknown_out[t] = again ? 1 : 0;
            if (again && positions_out) positions_out[(long long)b * count + r] = i;
        }
    }
}

extern "C" __global__ void lfq_codes(const long long* indices, long long M, int K, float scale, float* out) {
    long long total = M * K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long m = i / K;
        int k = (int)(i - m * K);
        long long bit = (indices[m] >> (K - 1 - k)) & 1;
        out[i] = bit ? scale : -scale;
    }
}

extern "C" __global__ void frames_uint8(const void* video, int is_bf16, int B, int T, long long HW, unsigned char* out) {
    long long per = (long long)(T - 1) * HW;
    long long total = (long long)B * per;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long b = i / per, r = i - b * per;
        float x = load(video, b * T * HW + HW + r, is_bf16);   // skip frame 0 (the prime)
        x = fminf(fmaxf(x, 0.f), 1.f);
        out[i] = (unsigned char)rintf(__fmul_rn(x, 255.f));    // half to even, like torch.round
    }
}
"""

KERNEL_NAMES = ("sample_confidence", "remask", "lfq_codes", "frames_uint8")
TOKEN_THREADS = 128  # threads per token in sample_confidence (the source's #define)
ELEMENTWISE_BLOCK = 256
# Where the launches' tensors must live. Only the tests change it: they run these methods'
# argument checks and packing on the CPU, with the source compiled for the host.
TENSOR_DEVICE = "cuda"


def _ptr(t: Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _check(t: Tensor, name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...] | None = None) -> None:
    if t.device.type != TENSOR_DEVICE or not t.is_contiguous() or t.dtype not in dtypes:
        raise ValueError(f"{name}: expected a contiguous {TENSOR_DEVICE} tensor of {dtypes}, got {t.dtype} on {t.device}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _next_pow2(n: int) -> int:
    return 1 << max(1, (n - 1).bit_length())


class FusedKernels:
    """The compiled module; every launch goes on torch's current CUDA stream."""

    def __init__(self, device: torch.device | int | None = None) -> None:
        import cupy  # only here: the CPU path never imports CuPy

        self._cp = cupy
        if device is None:
            self.device_index = torch.cuda.current_device()
        else:
            d = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
            self.device_index = d.index if d.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(self.device_index):
            # plain C in CUDA: no dialect option, so any NVRTC (CUDA 12 or 13) takes it as is
            module = cupy.RawModule(code=SOURCE)
            # get_function compiles (NVRTC) and loads the module now: never inside a capture
            self._fn = {name: module.get_function(name) for name in KERNEL_NAMES}
        self._streams: dict[int, object] = {}

    # plumbing

    def _stream(self) -> object:
        handle = torch.cuda.current_stream(self.device_index).cuda_stream
        stream = self._streams.get(handle)
        if stream is None:
            try:
                stream = self._cp.cuda.ExternalStream(handle, self.device_index)
            except TypeError:  # CuPy < 13 takes no device id
                stream = self._cp.cuda.ExternalStream(handle)
            self._streams[handle] = stream
        return stream

    def _launch(self, name: str, grid: int, block: int, args: tuple, shared: int = 0) -> None:
        # torch's current device is this one (the caller's contract): no device switch in a capture
        with self._stream():
            self._fn[name]((grid,), (block,), args, shared_mem=shared)

    # kernels

    def sample_confidence(
        self,
        logits2: Tensor,
        ids: Tensor,
        unknown: Tensor,
        seeds: Tensor,
        cond_scale: Tensor,
        temperature: Tensor,
        noise: Tensor,
        step: int,
        sampled: Tensor,
        conf: Tensor,
        positions: Tensor | None = None,
    ) -> None:
        """Fill `sampled` (B, N) long and `conf` (B, N) float32 from logits (2B, N, V) f32/bf16.

        With `positions` (B, U) long, logits2 is (2B, U, V): the logits of those tokens
        only, which must include every unknown token of the row (the rest keep their id
        and get +inf, as known tokens do). The noise is a token's own, wherever it sits."""
        b, n = ids.shape
        b2, u, v = logits2.shape
        if b2 != 2 * b:
            raise ValueError(f"logits2: expected {2 * b} rows (the CFG pair of {b}), got {b2}")
        _check(logits2, "logits2", (torch.float32, torch.bfloat16))
        _check(ids, "ids", (torch.int64,), (b, n))
        _check(unknown, "unknown", (torch.bool,), (b, n))
        _check(seeds, "seeds", (torch.int64,), (b,))
        if positions is None:
            if u != n:
                raise ValueError(f"logits2 holds {u} tokens per row, ids {n}: pass their positions")
        else:
            _check(positions, "positions", (torch.int64,), (b, u))
        for name, t in (("cond_scale", cond_scale), ("temperature", temperature), ("noise", noise)):
            _check(t, name, (torch.float32,))
        if not 0 <= step < temperature.numel():
            raise ValueError(f"step {step} outside the schedule of {temperature.numel()} steps")
        _check(sampled, "sampled", (torch.int64,), (b, n))
        _check(conf, "conf", (torch.float32,), (b, n))
        grid = max(1, b * u)  # a block per listed token
        args = (
            _ptr(logits2), np.int32(logits2.dtype == torch.bfloat16), _ptr(ids), _ptr(unknown), _ptr(seeds),
            _ptr(cond_scale), _ptr(temperature), _ptr(noise), np.int32(step), np.int32(b), np.int32(n),
            np.int32(v), np.uint64(0) if positions is None else _ptr(positions), np.int32(u), _ptr(sampled), _ptr(conf),
        )
        self._launch("sample_confidence", grid, TOKEN_THREADS, args)

    def remask(
        self,
        conf: Tensor,
        sampled: Tensor,
        n_masked: Tensor,
        step: int,
        mask_id: int,
        ids_out: Tensor,
        unknown_out: Tensor,
        positions_out: Tensor | None = None,
    ) -> None:
        """ids_out = sampled with the n_masked[step] least confident of each row set to mask_id;
        unknown_out marks them. `ids_out`/`unknown_out` may be the step's input buffers.
        `positions_out` (B, n_masked[step]) long, optional: their positions, least confident
        first (`reference_steps.remasked_positions`); its width must be that count."""
        b, n = conf.shape
        _check(conf, "conf", (torch.float32,))
        _check(sampled, "sampled", (torch.int64,), (b, n))
        _check(n_masked, "n_masked", (torch.int64,))
        _check(ids_out, "ids_out", (torch.int64,), (b, n))
        _check(unknown_out, "unknown_out", (torch.bool,), (b, n))
        if positions_out is not None:
            _check(positions_out, "positions_out", (torch.int64,))
            if positions_out.dim() != 2 or positions_out.shape[0] != b:
                raise ValueError(f"positions_out: expected ({b}, n_masked[step]), got {tuple(positions_out.shape)}")
        padded = _next_pow2(n)
        if padded > 4096:
            raise ValueError(f"remask sorts a row in shared memory: at most 4096 tokens, got {n}")
        block = min(padded, 1024)
        args = (
            _ptr(conf), _ptr(sampled), _ptr(n_masked), np.int32(step), np.int32(n), np.int32(padded),
            np.int64(mask_id), _ptr(ids_out), _ptr(unknown_out), np.uint64(0) if positions_out is None else _ptr(positions_out),
        )
        self._launch("remask", b, block, args, shared=padded * 8)

    def lfq_codes(self, indices: Tensor, bits: int, out: Tensor, scale: float = 1.0) -> None:
        """out (..., bits) float32 = ±scale per bit of `indices` (...), most significant first."""
        _check(indices, "indices", (torch.int64,))
        _check(out, "out", (torch.float32,), (*indices.shape, bits))
        total = indices.numel() * bits
        grid = max(1, min((total + ELEMENTWISE_BLOCK - 1) // ELEMENTWISE_BLOCK, 65535))
        args = (_ptr(indices), np.int64(indices.numel()), np.int32(bits), np.float32(scale), _ptr(out))
        self._launch("lfq_codes", grid, ELEMENTWISE_BLOCK, args)

    def frames_uint8(self, video: Tensor, out: Tensor) -> None:
        """out (B, T-1, H, W) uint8 from decoder video (B, 1, T, H, W) f32/bf16 in [0, 1]."""
        _check(video, "video", (torch.float32, torch.bfloat16))
        b, c, t, h, w = video.shape
        if c != 1:
            raise ValueError("frames_uint8 expects one channel")
        _check(out, "out", (torch.uint8,), (b, t - 1, h, w))
        total = out.numel()
        grid = max(1, min((total + ELEMENTWISE_BLOCK - 1) // ELEMENTWISE_BLOCK, 65535))
        args = (_ptr(video), np.int32(video.dtype == torch.bfloat16), np.int32(b), np.int32(t), np.int64(h * w), _ptr(out))
        self._launch("frames_uint8", grid, ELEMENTWISE_BLOCK, args)


def as_cupy(t: Tensor) -> object:
    """A zero-copy CuPy view of a CUDA tensor through DLPack (for tests and tools; the
    launches above pass raw pointers instead). bf16 is viewed as int16 bits."""
    import cupy

    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return cupy.from_dlpack(t)
