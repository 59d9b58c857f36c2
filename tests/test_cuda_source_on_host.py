"""The CUDA source of the fused kernels, compiled for the CPU with g++, against the torch references.

No GPU is needed: device intrinsics get host stand-ins, a block runs as one thread (every
`for (i = threadIdx.x; ...; i += blockDim.x)` loop then covers the whole block, and
`__syncthreads` orders nothing that is not already in order), and a warp's shuffle
reduction is replayed lane by lane with the kernel's own `lane_partial`/`merge`/`finish`
(`warp_merge` itself, being shuffles, runs on GPU only).
This checks the kernels' arithmetic, hashing, indexing, padding and tie-breaking; what it
cannot check (shared-memory races, real shuffles) the GPU tests do.

`HostKernels` runs `FusedKernels`' own methods with their launches going to this host
build: each argument's NumPy type is checked against the kernel's C signature (CuPy packs
a scalar by its type, so a wrong one shifts every later argument), and the launch geometry
against what the kernel needs. With nvcc installed (no GPU needed), the source is also
compiled for sm_90, as NVRTC compiles it on the GPU box.
Skipped when no C++ compiler is installed.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from echopulse.kernels import reference_steps as ref
from echopulse.kernels import cupy_kernels
from echopulse.kernels.cupy_kernels import KERNEL_NAMES, SOURCE, TOKEN_THREADS, FusedKernels

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


def build_host_library(folder: Path) -> ctypes.CDLL:
    """The kernels' source with the host stand-ins and harness, built into a shared library."""
    src = folder / "kernels.cpp"
    src.write_text(PRELUDE + SOURCE + HARNESS)
    out = folder / "kernels.so"
    # no fused multiply-add: the kernels round every operation on its own, as torch does
    subprocess.run([CXX, "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", str(src), "-o", str(out)],
                   check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(Path(out)))


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build_host_library(tmp_path_factory.mktemp("cuda_host"))


# What each kind of kernel parameter must be handed by `FusedKernels`: CuPy packs a NumPy
# scalar by its own width, so a wrong one shifts every later argument of the launch.
ARG_TYPES = {"pointer": np.uint64, "int": np.int32, "long long": np.int64, "float": np.float32}
C_TYPES = {"pointer": ctypes.c_void_p, "int": ctypes.c_int, "long long": ctypes.c_longlong, "float": ctypes.c_float}


def kernel_signatures(source: str = SOURCE) -> dict[str, list[str]]:
    """Each `extern "C" __global__` kernel's parameter kinds in order ("pointer", "int", ...)."""
    out = {}
    for match in re.finditer(r'extern "C" __global__ void (\w+)\((.*?)\)\s*\{', source, re.S):
        kinds = []
        for param in match.group(2).split(","):
            words = param.replace("const", " ").split()
            kinds.append("pointer" if "*" in param else " ".join(words[:-1]))
        out[match.group(1)] = kinds
    return out


def _pack(arg: np.generic, kind: str) -> ctypes._SimpleCData:
    if kind == "pointer":
        return ctypes.c_void_p(int(arg) or None)
    return C_TYPES[kind](arg.item())


class HostKernels(FusedKernels):
    """`FusedKernels` whose launches run the source compiled for the host: its argument checks,
    packing and launch geometry are the GPU's, checked against each kernel's signature."""

    def __init__(self, library: ctypes.CDLL | None) -> None:  # no CuPy, no module to compile; None: launches only checked
        self.lib = library
        self.signatures = kernel_signatures()
        self.launches: list[str] = []

    def _launch(self, name: str, grid: int, block: int, args: tuple, shared: int = 0) -> None:
        kinds = self.signatures[name]
        assert len(args) == len(kinds), f"{name}: {len(args)} arguments for {len(kinds)} parameters"
        for i, (arg, kind) in enumerate(zip(args, kinds)):
            assert type(arg) is ARG_TYPES[kind], f"{name} argument {i}: {type(arg).__name__} for a {kind}"
        assert 1 <= grid < 2**31 and 1 <= block <= 1024, (name, grid, block)
        if name == "sample_confidence":
            assert block == TOKEN_THREADS
        if name == "remask":  # the sort holds (key, position) of every padded token in shared memory
            assert shared >= int(args[5]) * 8 and block <= int(args[5])
        self.launches.append(name)
        if all(int(arg) == 0 for arg, kind in zip(args, kinds) if kind == "pointer"):
            return  # meta tensors (no storage): the checks above are the point
        packed = [_pack(arg, kind) for arg, kind in zip(args, kinds)]
        if name == "sample_confidence":
            self.lib.host_sample_confidence(*packed)
        elif name == "remask":  # the harness loops over the grid's rows itself
            self.lib.host_remask(*packed[:4], ctypes.c_int(grid), *packed[4:])
        else:  # grid-stride loops: one host thread covers the whole grid
            getattr(self.lib, name)(*packed)


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


# FusedKernels itself, its launches run on the host: what the GPU tests check, minus the GPU


@pytest.fixture
def host_kernels(lib: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch) -> HostKernels:
    monkeypatch.setattr(cupy_kernels, "TENSOR_DEVICE", "cpu")
    return HostKernels(lib)


def test_every_kernel_is_found_with_its_parameters() -> None:
    signatures = kernel_signatures()
    assert sorted(signatures) == sorted(KERNEL_NAMES)
    assert signatures["sample_confidence"][:3] == ["pointer", "int", "pointer"] and len(signatures["sample_confidence"]) == 16
    assert signatures["remask"][6] == "long long" and signatures["lfq_codes"][3] == "float"


def test_the_python_token_threads_are_the_sources() -> None:
    """The launch's block size and the kernel's per-warp scratch must agree, or warps go unmerged."""
    assert re.search(r"#define TOKEN_THREADS (\d+)", SOURCE).group(1) == str(TOKEN_THREADS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("listed", [False, True])
def test_sample_confidence_launch_matches_the_reference(host_kernels: HostKernels, dtype: torch.dtype, listed: bool) -> None:
    b, n, v = 2, 40, 96
    g = torch.Generator().manual_seed(3)
    logits2 = (torch.randn(2 * b, n, v, generator=g) * 2).to(dtype)
    ids = torch.randint(0, v, (b, n), generator=g)
    unknown = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        unknown[row, torch.randperm(n, generator=g)[:7]] = True
    seeds = torch.tensor([7, 2**35 + 3])
    cond_scale, temperature, noise = torch.tensor(2.5), torch.tensor([0.8, 0.4]), torch.tensor([1.5, 0.5])
    positions = (~unknown).to(torch.uint8).argsort(dim=-1, stable=True)[:, :7].contiguous() if listed else None
    given = logits2.gather(1, torch.cat([positions, positions])[..., None].expand(-1, -1, v)).contiguous() if listed else logits2
    sampled = torch.full((b, n), -7, dtype=torch.long)
    conf = torch.full((b, n), float("nan"))
    host_kernels.sample_confidence(given, ids, unknown, seeds, cond_scale, temperature, noise, 1, sampled, conf, positions=positions)
    want_s, want_c, _ = ref.sample_confidence(logits2, ids, unknown, seeds, cond_scale, temperature[1], noise[1], 1)
    assert host_kernels.launches == ["sample_confidence"]
    assert (sampled == want_s).float().mean().item() >= 0.99
    same = unknown & (sampled == want_s)
    torch.testing.assert_close(conf[same], want_c[same], rtol=1e-5, atol=1e-5)
    assert torch.equal(sampled[~unknown], ids[~unknown]) and torch.isinf(conf[~unknown]).all()


@pytest.mark.parametrize("with_positions", [False, True])
def test_remask_launch_matches_the_reference(host_kernels: HostKernels, with_positions: bool) -> None:
    b, n = 3, 48
    g = torch.Generator().manual_seed(5)
    conf = torch.randn(b, n, generator=g)
    conf[:, :8] = float("inf")
    conf[2, 10:14] = 0.5  # ties: broken by position
    sampled = torch.randint(0, 64, (b, n), generator=g)
    n_masked = torch.tensor([20, 9, 0])
    ids = torch.full((b, n), -3, dtype=torch.long)
    unknown = torch.ones(b, n, dtype=torch.bool)
    positions = torch.full((b, 9), -5, dtype=torch.long) if with_positions else None
    host_kernels.remask(conf, sampled, n_masked, 1, 64, ids, unknown, positions)
    want_ids, want_unknown = ref.remask(conf, sampled, n_masked[1], 64)
    assert torch.equal(ids, want_ids) and torch.equal(unknown, want_unknown)
    if with_positions:
        assert torch.equal(positions, ref.remasked_positions(conf, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conversion_launches_match_the_references(host_kernels: HostKernels, dtype: torch.dtype) -> None:
    idx = torch.randint(0, 2**10, (2, 30))
    codes = torch.full((2, 30, 10), float("nan"))
    host_kernels.lfq_codes(idx, 10, codes, scale=0.5)
    assert torch.equal(codes, ref.lfq_codes(idx, 10, 0.5))
    video = (torch.rand(2, 1, 5, 8, 8) * 1.3 - 0.15).to(dtype)
    frames = torch.full((2, 4, 8, 8), 77, dtype=torch.uint8)
    host_kernels.frames_uint8(video, frames)
    assert torch.equal(frames, ref.frames_uint8(video))
    assert host_kernels.launches == ["lfq_codes", "frames_uint8"]


def test_launches_refuse_tensors_off_the_kernels_device(lib: ctypes.CDLL) -> None:
    """Outside the host harness the tensors must be CUDA tensors: a CPU one is refused, never launched."""
    kernels = HostKernels(lib)
    with pytest.raises(ValueError, match="contiguous cuda tensor"):
        kernels.lfq_codes(torch.zeros(2, 3, dtype=torch.long), 4, torch.zeros(2, 3, 4))
    assert kernels.launches == []


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="no nvcc: the CUDA compile check needs the CUDA toolkit (no GPU)")
def test_the_source_compiles_for_hopper_without_spills(tmp_path: Path) -> None:
    """CuPy compiles SOURCE with NVRTC on the GPU box; nvcc here catches CUDA-only errors
    (device intrinsics, shared-memory declarations) before a lent GPU's minutes are spent,
    and ptxas reports what a kernel keeps in local memory."""
    src = tmp_path / "kernels.cu"
    src.write_text(SOURCE)
    proc = subprocess.run([NVCC, "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-Werror", "all-warnings",
                           "-o", str(tmp_path / "kernels.cubin"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout + proc.stderr
    for name in KERNEL_NAMES:
        assert f"Compiling entry function '{name}'" in report  # extern "C": the name CuPy's get_function asks for
    assert "bytes spill" in report and not re.search(r"[1-9]\d* bytes spill", report), report
    assert not re.search(r"[1-9]\d* bytes stack frame", report), report
