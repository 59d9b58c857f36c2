"""Each CuPy kernel against its torch reference (kernels/reference_steps.py), on the GPU.

Skipped without a CUDA device or without CuPy. Outputs are poisoned before every launch,
so an element the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from echopulse.kernels import reference_steps as ref

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CuPy kernels run on GPU only", allow_module_level=True)
if importlib.util.find_spec("cupy") is None:
    pytest.skip("CuPy not installed (pip install cupy-cuda12x or cupy-cuda13x to match torch.version.cuda)",
                allow_module_level=True)

from echopulse.kernels.cupy_kernels import FusedKernels, as_cupy  # noqa: E402

DEV = torch.device("cuda")


@pytest.fixture(scope="module")
def kernels() -> FusedKernels:
    return FusedKernels(DEV)


def _step_inputs(b: int, n: int, v: int, dtype: torch.dtype, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    logits2 = (torch.randn(2 * b, n, v, device=DEV, generator=g) * 2).to(dtype).contiguous()
    ids = torch.randint(0, v, (b, n), device=DEV, generator=g)
    unknown = torch.rand(b, n, device=DEV, generator=g) < 0.6
    seeds = torch.randint(0, 2**62, (b,), device=DEV, generator=g)
    return logits2, ids, unknown, seeds


@pytest.mark.parametrize("b,n,v", [(3, 384, 1024), (2, 1536, 8192), (1, 70, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_confidence_matches_the_reference(kernels: FusedKernels, b: int, n: int, v: int, dtype: torch.dtype) -> None:
    logits2, ids, unknown, seeds = _step_inputs(b, n, v, dtype, seed=b * n + v)
    cond_scale = torch.tensor(3.0, device=DEV)
    temperature = torch.tensor([0.9, 0.45, 0.0], device=DEV)
    noise = torch.tensor([2.0, 1.0, 0.0], device=DEV)
    for step in range(3):
        want_s, want_c, _ = ref.sample_confidence(logits2, ids, unknown, seeds, cond_scale, temperature[step], noise[step], step)
        sampled = torch.full((b, n), -7, dtype=torch.long, device=DEV)
        conf = torch.full((b, n), float("nan"), device=DEV)
        kernels.sample_confidence(logits2, ids, unknown, seeds, cond_scale, temperature, noise, step, sampled, conf)
        torch.cuda.synchronize()
        assert torch.equal(sampled[~unknown], ids[~unknown])
        assert torch.isinf(conf[~unknown]).all()
        agree = (sampled == want_s).float().mean().item()
        # same hash bits, same rounding order: only a 1-ulp difference in log() could flip a near tie
        assert agree >= 0.999, f"step {step}: {agree:.4f} of sampled ids agree"
        same = unknown & (sampled == want_s)
        torch.testing.assert_close(conf[same], want_c[same], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b,n,v", [(3, 384, 1024), (2, 1536, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_confidence_reads_logits_of_the_unknown_tokens_alone(
    kernels: FusedKernels, b: int, n: int, v: int, dtype: torch.dtype
) -> None:
    """The resident generator's form: logits for the unknown tokens only, at their positions.
    Same ids and confidences as from the full logits; known tokens keep theirs."""
    logits2, ids, unknown, seeds = _step_inputs(b, n, v, dtype, seed=n + v)
    count = int(unknown.sum(-1).min())
    unknown[:] = False
    g = torch.Generator(device=DEV).manual_seed(1)
    for row in range(b):  # the same count of unknown tokens in every row, as in a decode
        unknown[row, torch.randperm(n, device=DEV, generator=g)[:count]] = True
    positions = (~unknown).to(torch.uint8).argsort(dim=-1, stable=True)[:, :count].contiguous()
    listed = logits2.gather(1, torch.cat([positions, positions])[..., None].expand(-1, -1, v)).contiguous()
    cond_scale = torch.tensor(3.0, device=DEV)
    temperature = torch.tensor([0.9], device=DEV)
    noise = torch.tensor([2.0], device=DEV)
    out = []
    for logits, pos in ((logits2, None), (listed, positions)):
        sampled = torch.full((b, n), -7, dtype=torch.long, device=DEV)
        conf = torch.full((b, n), float("nan"), device=DEV)
        kernels.sample_confidence(logits, ids, unknown, seeds, cond_scale, temperature, noise, 0, sampled, conf, positions=pos)
        out.append((sampled, conf))
    torch.cuda.synchronize()
    (s_full, c_full), (s_listed, c_listed) = out
    assert torch.equal(s_listed, s_full) and torch.equal(c_listed, c_full)
    assert torch.equal(s_listed[~unknown], ids[~unknown]) and torch.isinf(c_listed[~unknown]).all()
    with pytest.raises(ValueError, match="positions"):
        kernels.sample_confidence(listed, ids, unknown, seeds, cond_scale, temperature, noise, 0, s_full, c_full)


@pytest.mark.parametrize("n", [48, 384, 1536])
def test_remask_matches_the_stable_rank_reference(kernels: FusedKernels, n: int) -> None:
    b = 4
    g = torch.Generator(device=DEV).manual_seed(n)
    conf = torch.randn(b, n, device=DEV, generator=g)
    conf[:, : n // 6] = float("inf")                            # known tokens
    conf[1, 10:20] = 0.25                                       # ties: broken by position
    sampled = torch.randint(0, 8192, (b, n), device=DEV, generator=g)
    n_masked = torch.tensor([n // 2, n // 5, 0], device=DEV)
    for step in range(3):
        want_ids, want_unknown = ref.remask(conf, sampled, n_masked[step], 8192)
        ids = torch.full((b, n), -3, dtype=torch.long, device=DEV)
        unknown = torch.ones(b, n, dtype=torch.bool, device=DEV)
        count = int(n_masked[step])
        positions = torch.full((b, count), -5, dtype=torch.long, device=DEV)
        kernels.remask(conf, sampled, n_masked, step, 8192, ids, unknown, positions_out=positions if count else None)
        torch.cuda.synchronize()
        assert torch.equal(ids, want_ids)
        assert torch.equal(unknown, want_unknown)
        assert torch.equal(positions, ref.remasked_positions(conf, count))


@pytest.mark.parametrize("bits", [10, 13])
def test_lfq_codes_match_the_reference(kernels: FusedKernels, bits: int) -> None:
    idx = torch.randint(0, 2**bits, (3, 1536), device=DEV)
    out = torch.full((3, 1536, bits), float("nan"), device=DEV)
    kernels.lfq_codes(idx, bits, out, scale=0.75)
    torch.cuda.synchronize()
    assert torch.equal(out, ref.lfq_codes(idx, bits, 0.75))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_uint8_match_the_reference(kernels: FusedKernels, dtype: torch.dtype) -> None:
    video = (torch.rand(3, 1, 11, 128, 128, device=DEV) * 1.3 - 0.15).to(dtype)
    video[0, 0, 1, 0, :3] = torch.tensor([0.5 / 255, 1.5 / 255, 2.5 / 255], device=DEV).to(dtype)
    out = torch.full((3, 10, 128, 128), 77, dtype=torch.uint8, device=DEV)
    kernels.frames_uint8(video, out)
    torch.cuda.synchronize()
    assert torch.equal(out, ref.frames_uint8(video))


def test_kernels_run_on_torchs_stream_and_capture_into_a_graph(kernels: FusedKernels) -> None:
    video = torch.rand(2, 1, 5, 64, 64, device=DEV)
    out = torch.zeros(2, 4, 64, 64, dtype=torch.uint8, device=DEV)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        kernels.frames_uint8(video, out)  # warm-up launch on a side stream
    side.synchronize()
    assert torch.equal(out, ref.frames_uint8(video))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.frames_uint8(video, out)
    video.copy_(torch.rand_like(video))   # new input, same address
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref.frames_uint8(video))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_as_cupy_shares_the_tensors_memory(dtype: torch.dtype) -> None:
    """DLPack: a CuPy view of the same bytes, no copy (bf16 seen as its int16 bits)."""
    t = torch.arange(12, device="cuda", dtype=torch.float32).to(dtype).reshape(3, 4)
    view = as_cupy(t)
    assert view.data.ptr == t.data_ptr() and view.shape == (3, 4)
    view[0, 0] = view[1, 1]  # written through CuPy, seen by torch
    assert t[0, 0].item() == t[1, 1].item()

