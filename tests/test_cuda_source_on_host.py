"""The CUDA source of the fused kernels, compiled for the CPU with g++, against the torch references.

No GPU is needed: device intrinsics get host stand-ins, a block runs as one thread (every
`for (i = threadIdx.x; ...; i += blockDim.x)` loop then covers the whole block, and
`__syncthreads` orders nothing that is not already in order), and a warp's shuffle
reduction is replayed lane by lane with the kernel's own `lane_partial`/`merge`/`finish`
(`warp_merge` itself, being shuffles, runs on GPU only).
This checks the kernels' arithmetic, hashing, indexing, padding and tie-breaking; what it
cannot check (launch geometry, shared-memory races, real shuffles) the GPU tests do.
Skipped when no C++ compiler is installed.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from echopulse.kernels import reference_steps as ref
from echopulse.kernels.cupy_kernels import SOURCE

CXX = shutil.which("g++") or shutil.which("clang++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/clang++) to build the host harness")

PRELUDE = r"""
#include <cmath>
#include <cstring>
#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__
struct HostDim { unsigned int x; };
static HostDim threadIdx{0}, blockIdx{0}, blockDim{1}, gridDim{1};
static inline void __syncthreads() {}
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
template <typename T> static inline T __shfl_xor_sync(unsigned int, T v, int) { return v; }  // replayed below
unsigned char smem[1 << 16];
"""

HARNESS = r"""
extern "C" void host_sample_confidence(
    const void* logits2, int is_bf16, const long long* ids, const unsigned char* unknown,
    const long long* seeds, const float* cond_scale, const float* temperature, const float* noise,
    int step, int B, int N, int V, const long long* positions, int U, long long* sampled, float* conf)
{
    keep_known(ids, unknown, (long long)B * N, 0, 1, sampled, conf);
    for (long long w = 0; w < (long long)B * U; ++w) {  // the kernel's blocks, one after another
        int b, n;
        long long t = listed_token(w, positions, U, N, &b, &n);
        if (!unknown[t]) continue;
        Partial lanes[TOKEN_THREADS], next[TOKEN_THREADS];
        for (int l = 0; l < TOKEN_THREADS; ++l)
            lanes[l] = lane_partial(logits2, is_bf16, w * V, (w + (long long)B * U) * V,
                                    cond_scale[0], temperature[step], row_key(seeds[b], step, 0), n, V, l, TOKEN_THREADS);
        for (int off = 16; off > 0; off >>= 1) {         // each warp's xor butterfly, lane by lane
            for (int l = 0; l < TOKEN_THREADS; ++l) next[l] = merge(lanes[l], lanes[l ^ off]);
            for (int l = 0; l < TOKEN_THREADS; ++l) lanes[l] = next[l];
        }
        Partial total = lanes[0];                        // then thread 0 merges the warps in order
        for (int i = 1; i < TOKEN_THREADS / 32; ++i) total = merge(total, lanes[32 * i]);
        finish(total, seeds[b], step, n, noise[step], sampled, conf, t);
    }
}

extern "C" void host_remask(const float* conf, const long long* sampled, const long long* n_masked, int step,
                            int B, int N, int NP, long long mask_id, long long* ids_out, unsigned char* unknown_out,
                            long long* positions_out) {
    for (int b = 0; b < B; ++b) {
        blockIdx.x = b;
        remask(conf, sampled, n_masked, step, N, NP, mask_id, ids_out, unknown_out, positions_out);
    }
    blockIdx.x = 0;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    folder = tmp_path_factory.mktemp("cuda_host")
    src = folder / "kernels.cpp"
    src.write_text(PRELUDE + SOURCE + HARNESS)
    out = folder / "kernels.so"
    # no fused multiply-add: the kernels round every operation on its own, as torch does
    subprocess.run([CXX, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", str(src), "-o", str(out)],
                   check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(Path(out)))


def _p(a: np.ndarray) -> ctypes.c_void_p:
    return a.ctypes.data_as(ctypes.c_void_p)


def _i(x: int) -> ctypes.c_int:
    return ctypes.c_int(x)


def _ll(x: int) -> ctypes.c_longlong:
    return ctypes.c_longlong(x)


@pytest.mark.parametrize("b,n,v,bf16", [(2, 48, 64, False), (2, 40, 1024, False), (1, 30, 8192, True), (1, 5, 20, False)])
def test_sample_confidence_source_matches_the_reference(lib: ctypes.CDLL, b: int, n: int, v: int, bf16: bool) -> None:
    g = torch.Generator().manual_seed(b * n + v)
    logits2 = torch.randn(2 * b, n, v, generator=g) * 2
    if bf16:
        logits2 = logits2.bfloat16()
    logits2[:, 0] = 1.0  # token 0: every id ties, the first must win (torch.argmax)
    ids = torch.randint(0, v, (b, n), generator=g)
    unknown = torch.rand(b, n, generator=g) < 0.7
    unknown[:, 0] = True
    seeds = torch.tensor([3, 2**40 + 11][:b])
    cond_scale = torch.tensor([3.0])
    temperature = torch.tensor([0.9, 0.3, 0.0])
    noise = torch.tensor([2.0, 1.0, 0.0])
    raw = logits2.view(torch.int16).numpy() if bf16 else logits2.numpy()
    for step in range(3):
        want_s, want_c, _ = ref.sample_confidence(logits2, ids, unknown, seeds, cond_scale[0], temperature[step], noise[step], step)
        sampled = np.full((b, n), -7, np.int64)
        conf = np.full((b, n), np.nan, np.float32)
        lib.host_sample_confidence(
            _p(raw), _i(int(bf16)), _p(ids.numpy()), _p(unknown.numpy().view(np.uint8)), _p(seeds.numpy()),
            _p(cond_scale.numpy()), _p(temperature.numpy()), _p(noise.numpy()), _i(step), _i(b), _i(n), _i(v),
            None, _i(n), _p(sampled), _p(conf),
        )
        sampled_t, conf_t = torch.from_numpy(sampled), torch.from_numpy(conf)
        # host logf vs torch's vectorised log may differ in the last bit: near ties could flip
        assert (sampled_t == want_s).float().mean().item() >= 0.99
        same = unknown & (sampled_t == want_s)
        torch.testing.assert_close(conf_t[same], want_c[same], rtol=1e-5, atol=1e-5)
        assert torch.equal(sampled_t[~unknown], ids[~unknown]) and torch.isinf(conf_t[~unknown]).all()
        if step == 2:  # temperature 0: no log anywhere in the choice, so exactly the argmax
            assert torch.equal(sampled_t, want_s)
            assert (sampled_t[:, 0] == 0).all()


@pytest.mark.parametrize("bf16", [False, True])
def test_sample_confidence_source_reads_logits_of_the_listed_tokens(lib: ctypes.CDLL, bf16: bool) -> None:
    """Logits computed for the unknown tokens alone, at their positions: the same ids and
    confidences as from the full logits, and the known tokens keep theirs."""
    b, n, v = 2, 40, 96
    g = torch.Generator().manual_seed(11)
    full = torch.randn(2 * b, n, v, generator=g) * 2
    ids = torch.randint(0, v, (b, n), generator=g)
    unknown = torch.zeros(b, n, dtype=torch.bool)
    unknown[0, [3, 4, 17, 30, 39]] = True
    unknown[1, [0, 5, 6, 21, 22]] = True
    positions = (~unknown).to(torch.uint8).argsort(dim=-1, stable=True)[:, :5].contiguous()
    listed = full.gather(1, torch.cat([positions, positions])[..., None].expand(-1, -1, v)).contiguous()
    if bf16:
        full, listed = full.bfloat16(), listed.bfloat16()
    raw = (lambda x: x.view(torch.int16).numpy() if bf16 else x.numpy())
    seeds = torch.tensor([5, 2**33 + 1])
    cond_scale, temperature, noise = torch.tensor([2.0]), torch.tensor([0.7]), torch.tensor([1.5])
    outputs = []
    for logits2, pos, u in ((full, None, n), (listed, positions, 5)):
        sampled = np.full((b, n), -7, np.int64)
        conf = np.full((b, n), np.nan, np.float32)
        lib.host_sample_confidence(
            _p(raw(logits2)), _i(int(bf16)), _p(ids.numpy()), _p(unknown.numpy().view(np.uint8)), _p(seeds.numpy()),
            _p(cond_scale.numpy()), _p(temperature.numpy()), _p(noise.numpy()), _i(0), _i(b), _i(n), _i(v),
            None if pos is None else _p(pos.numpy()), _i(u), _p(sampled), _p(conf),
        )
        outputs.append((sampled, conf))
    (s_full, c_full), (s_listed, c_listed) = outputs
    assert np.array_equal(s_listed, s_full) and np.array_equal(c_listed, c_full)
    assert np.isinf(c_listed[~unknown.numpy()]).all() and np.isfinite(c_listed[unknown.numpy()]).all()
    want_s, _, _ = ref.sample_confidence(listed, ids, unknown, seeds, cond_scale[0], temperature[0], noise[0], 0, positions)
    assert np.array_equal(np.take_along_axis(s_listed, positions.numpy(), 1), want_s.numpy())


@pytest.mark.parametrize("n", [7, 48, 384, 1536])
def test_remask_source_matches_the_stable_rank(lib: ctypes.CDLL, n: int) -> None:
    b = 3
    g = torch.Generator().manual_seed(n)
    conf = torch.randn(b, n, generator=g)
    conf[:, : max(1, n // 6)] = float("inf")
    conf[1, 2:6] = 0.125                                   # ties
    sampled = torch.randint(0, 1000, (b, n), generator=g)
    n_masked = torch.tensor([n // 2, n // 5, 0])
    padded = 1 << max(1, (n - 1).bit_length())
    for step in range(3):
        want_ids, want_unknown = ref.remask(conf, sampled, n_masked[step], 1000)
        ids = np.full((b, n), -3, np.int64)
        unknown = np.full((b, n), 9, np.uint8)
        count = int(n_masked[step])
        positions = np.full((b, count), -5, np.int64)
        lib.host_remask(_p(conf.numpy()), _p(sampled.numpy()), _p(n_masked.numpy()), _i(step), _i(b), _i(n), _i(padded),
                        _ll(1000), _p(ids), _p(unknown), _p(positions) if count else None)
        assert torch.equal(torch.from_numpy(ids), want_ids)
        assert torch.equal(torch.from_numpy(unknown).bool(), want_unknown) and unknown.max() <= 1
        assert torch.equal(torch.from_numpy(positions), ref.remasked_positions(conf, count))


def test_lfq_codes_source_matches_the_reference(lib: ctypes.CDLL) -> None:
    idx = torch.randint(0, 2**13, (3, 50))
    out = np.full((3, 50, 13), np.nan, np.float32)
    lib.lfq_codes(_p(idx.numpy()), _ll(idx.numel()), _i(13), ctypes.c_float(0.5), _p(out))
    assert torch.equal(torch.from_numpy(out), ref.lfq_codes(idx, 13, 0.5))


@pytest.mark.parametrize("bf16", [False, True])
def test_frames_source_matches_the_reference(lib: ctypes.CDLL, bf16: bool) -> None:
    video = torch.rand(2, 1, 5, 8, 8) * 1.3 - 0.15
    video[0, 0, 1, 0, :3] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255])
    if bf16:
        video = video.bfloat16()
    raw = video.view(torch.int16).numpy() if bf16 else video.numpy()
    out = np.full((2, 4, 8, 8), 77, np.uint8)
    lib.frames_uint8(_p(raw), _i(int(bf16)), _i(2), _i(5), _ll(64), _p(out))
    assert torch.equal(torch.from_numpy(out), ref.frames_uint8(video))
