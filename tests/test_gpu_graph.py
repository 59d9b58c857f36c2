"""The captured beat pipeline gives the eager pipeline's tokens for the same seeds (GPU only)."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from echopulse.core.critic import TokenCritic
from echopulse.core.generator import Generator
from echopulse.core.resident import BeatRequest, ResidentGenerator, clone_states, precision_report

from _generator_fixtures import resident_requests

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: CUDA graphs need one", allow_module_level=True)

HAS_CUPY = importlib.util.find_spec("cupy") is not None
needs_cupy = pytest.mark.skipif(not HAS_CUPY, reason="CuPy not installed (cupy-cuda12x / cupy-cuda13x)")


@pytest.fixture(scope="module")
def generator() -> Generator:
    return Generator.untrained("tiny", device="cuda", seed=4)


def _requests(res: ResidentGenerator, count: int, seed: int = 0, priming: str = "loop") -> list[BeatRequest]:
    return resident_requests(res, count, seed, priming)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens)
        assert np.array_equal(x.frames, y.frames)


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cupy", marks=needs_cupy)])
@pytest.mark.parametrize("count,priming", [(1, "loop"), (3, "loop"), (2, "image")])  # dense, masked, no_ref
def test_captured_equals_eager_for_the_same_seeds(generator: Generator, kernels: str, count: int, priming: str) -> None:
    eager = ResidentGenerator(generator, kernels=kernels, pad=True)  # the same padded batch as the graph
    captured = ResidentGenerator(generator, kernels=kernels, graphs=True)
    requests = _requests(eager, count, priming=priming)
    first_e = eager.generate(clone_states(requests))
    first_c = captured.generate(clone_states(requests))
    _same(first_e, first_c)
    # new seeds written in place into the graph's inputs: a different clip, still equal to eager
    for r in requests:
        r.seed += 17
    second_e = eager.generate(clone_states(requests))
    second_c = captured.generate(clone_states(requests))
    _same(second_e, second_c)
    assert not np.array_equal(first_c[0].tokens, second_c[0].tokens)


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cupy", marks=needs_cupy)])
def test_captured_equals_eager_with_flash_attention_first(generator: Generator, kernels: str) -> None:
    eager = ResidentGenerator(generator, kernels=kernels, pad=True, attention="flash")
    captured = ResidentGenerator(generator, kernels=kernels, graphs=True, attention="flash")
    for count in (1, 3):  # dense (flash runs), masked (flash refuses the mask: the next backend)
        requests = _requests(eager, count, seed=count)
        _same(eager.generate(clone_states(requests)), captured.generate(clone_states(requests)))


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cupy", marks=needs_cupy)])
def test_captured_equals_eager_with_a_critic(kernels: str) -> None:
    """The critic's confidence (its own forward, then the hash noise) inside the capture,
    into either remask: no other GPU test has a critic."""
    gen = Generator.untrained("tiny", device="cuda", seed=7)
    torch.manual_seed(7)
    gen.critic = TokenCritic(gen.preset.transformer, gen.preset.tokenizer, gen.preset.ecg.dim).to("cuda").eval()
    eager = ResidentGenerator(gen, kernels=kernels, pad=True)
    captured = ResidentGenerator(gen, kernels=kernels, graphs=True)
    requests = _requests(eager, 3, seed=13)
    _same(eager.generate(clone_states(requests)), captured.generate(clone_states(requests)))


# Inductor suggests TF32 for fp32 matmuls; fp32 here is kept exact on purpose (configure_backends)
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores:UserWarning")
def test_compiled_models_inside_the_graph_agree_with_the_eager_path(generator: Generator) -> None:
    """Inductor's kernels recorded in our capture: the same beats up to its fused rounding."""
    plain = ResidentGenerator(generator)
    compiled = ResidentGenerator(generator, graphs=True, compile=True)
    report = precision_report(plain, compiled, _requests(plain, 2, seed=12))
    assert report["token_agreement"] >= 0.9, report
    assert report["decode_pixel_max"] <= 1, report  # the compiled decoder: rounding, one grey level at most


@needs_cupy
def test_cupy_path_agrees_with_the_torch_path(generator: Generator) -> None:
    """Same hash noise, same sampled ids; confidences differ in the last bits (online
    log-sum-exp), which can swap two tokens at the remask threshold: near, not exact."""
    torch_path = ResidentGenerator(generator)
    cupy_path = ResidentGenerator(generator, kernels="cupy")
    report = precision_report(torch_path, cupy_path, _requests(torch_path, 4, seed=5))
    assert report["token_agreement"] >= 0.9, report
    assert report["decode_pixel_max"] == 0, report  # LFQ + frames kernels are exact


def test_bf16_accuracy_is_measured_against_fp32(generator: Generator) -> None:
    fp32 = ResidentGenerator(generator)
    bf16 = ResidentGenerator(generator, precision="bf16")
    report = precision_report(fp32, bf16, _requests(fp32, 4, seed=6))
    assert 0.0 <= report["token_agreement"] <= 1.0
    assert report["decode_pixel_mae"] < 16, report  # the decoder alone: bf16 rounding, not resampling


def test_graph_per_batch_size_and_key_layout_is_captured_once(generator: Generator) -> None:
    res = ResidentGenerator(generator, graphs=True)
    res.warm_up(batch_sizes=(1, 2))
    want = sorted((b, 1, layout) for b in (1, 2) for layout in ("dense", "masked", "no_ref"))
    assert sorted(res.graphs.keys()) == want
    res.generate(_requests(res, 2))
    res.generate(_requests(res, 1))
    res.generate(_requests(res, 2, priming="image"))
    assert sorted(res.graphs.keys()) == want
    res.drop_graphs()
    assert res.graphs.keys() == []
    res.generate(_requests(res, 1))
    assert res.graphs.keys() == [(1, 1, "dense")]


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cupy", marks=needs_cupy)])
def test_batched_replay_serves_each_device_as_alone(generator: Generator, kernels: str) -> None:
    """Rows are independent and their noise is their own; only cuBLAS may pick another
    algorithm for another batch size, so the agreement is near total, not guaranteed exact."""
    res = ResidentGenerator(generator, kernels=kernels, graphs=True)
    requests = _requests(res, 3, seed=8)
    alone = [res.generate(clone_states([r]))[0] for r in requests]
    together = res.generate(clone_states(requests))
    hw = res.transformer.prime_tokens
    agree = np.mean([(a.tokens[hw:] == b.tokens[hw:]).mean() for a, b in zip(alone, together)])
    assert agree >= 0.9, agree


@pytest.mark.parametrize("kernels", ["torch", pytest.param("cupy", marks=needs_cupy)])
def test_sampling_settings_written_in_place_reach_the_graph(generator: Generator, kernels: str) -> None:
    captured = ResidentGenerator(generator, kernels=kernels, graphs=True)
    eager = ResidentGenerator(generator, kernels=kernels, pad=True)
    requests = _requests(captured, 1, seed=9)
    captured.generate(clone_states(requests))  # captured with the preset's settings
    for res in (captured, eager):
        res.set_sampling(temperature=0.5, confidence_noise=1.0, cfg_scale=1.5)
    _same(eager.generate(clone_states(requests)), captured.generate(clone_states(requests)))
