"""The resident generator on CPU: same beats as the Generator facade, static buffers, precision report."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from echopulse.core.config import tiny
from echopulse.core.generator import Generator
from echopulse.core.resident import BeatRequest, ResidentGenerator, StageTimer, clone_states, precision_report

from _generator_fixtures import small_preset


def _greedy(preset_name: str = "tiny"):
    p = tiny() if preset_name == "tiny" else small_preset()
    p.transformer = dataclasses.replace(p.transformer, temperature=0.0, confidence_noise=0.0)
    return p


def test_greedy_beats_equal_the_generator_facade() -> None:
    """Without noise the sampling is deterministic, so the two implementations must agree exactly,
    frames and the prime carried to the next beat included."""
    torch.set_num_threads(1)
    gen = Generator.untrained(_greedy(), device="cpu", seed=2)
    res = ResidentGenerator(gen)
    rng = np.random.default_rng(1)
    loop = rng.integers(0, 256, (11, 64, 64), dtype=np.uint8)
    n = gen.preset.ecg.window_samples
    gen.prime_loop(loop)
    state = res.prime_loop(loop, seed=0)
    for beat in range(2):
        window = rng.standard_normal((1, n)).astype(np.float32)
        valid = np.arange(n) < n - 100
        want, want_times = gen.generate_beat(window, valid, r_time=beat * 0.8, rr=0.8)
        [got] = res.generate([BeatRequest(state, window, valid, rr=0.8, r_time=beat * 0.8, seed=beat)])
        assert np.array_equal(got.frames, want)
        assert np.allclose(got.times, want_times)
        assert torch.equal(state.prime, gen.state.prime[0])


def test_contexts_equal_the_transformer_guidance_context() -> None:
    gen = Generator.untrained(small_preset(), device="cpu")
    res = ResidentGenerator(gen)
    buf = res.buffers(2, 1)
    buf.window.normal_()
    buf.ref_valid[0] = True
    buf.ref_ids.random_(0, 64)
    with torch.inference_mode():
        got, _ = res.contexts(buf)
        from echopulse.core.transformer import EcgFeatures

        ecg = EcgFeatures(*gen.ecg_encoder.encode(buf.window, buf.valid, buf.lead_ids))
        want = gen.transformer.guidance_context(ecg, buf.rr, buf.ref_ids, buf.ref_valid)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)


def test_stage_timer_sees_every_stage_and_the_schedule_fills_every_token() -> None:
    res = ResidentGenerator(Generator.untrained(small_preset(), device="cpu"))
    buf = res.buffers(1, 1)
    timer = StageTimer()
    timer.start()
    res.run(buf, timer)
    assert list(timer.times) == ["ecg_encode", *[f"decode_step_{s}" for s in range(res.steps)], "tokenizer_decode", "reprime"]
    assert not (buf.ids == res.transformer.mask_id).any()
    assert not buf.unknown.any()


def _requests(res: ResidentGenerator, count: int) -> list[BeatRequest]:
    rng = np.random.default_rng(3)
    size, n = res.preset.tokenizer.image_size, res.preset.ecg.window_samples
    return [
        BeatRequest(res.prime_image(rng.integers(0, 256, (size, size), dtype=np.uint8), seed=i),
                    rng.standard_normal((1, n)).astype(np.float32), np.ones(n, bool), 0.8, 0.0, seed=i)
        for i in range(count)
    ]


def test_precision_report_is_exact_against_itself_and_measures_bf16() -> None:
    gen = Generator.untrained(small_preset(), device="cpu")
    fp32 = ResidentGenerator(gen)
    requests = _requests(fp32, 2)
    same = precision_report(fp32, ResidentGenerator(gen), requests)
    assert same["token_agreement"] == 1.0 and same["pixel_max"] == 0 and same["decode_pixel_max"] == 0
    bf16 = precision_report(fp32, ResidentGenerator(gen, precision="bf16"), requests)
    assert 0.0 <= bf16["token_agreement"] <= 1.0
    assert 0 < bf16["decode_pixel_max"] <= 255  # bf16 really ran: the decoder's pixels moved
    assert torch.equal(requests[0].state.prime, clone_states(requests)[0].state.prime)  # states untouched


def test_gpu_options_are_refused_on_cpu() -> None:
    gen = Generator.untrained(small_preset(), device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        ResidentGenerator(gen, kernels="cupy")
    with pytest.raises(ValueError, match="CUDA"):
        ResidentGenerator(gen, graphs=True)
    with pytest.raises(ValueError, match="precision"):
        ResidentGenerator(gen, precision="fp16")


def _greedy_beats(res: ResidentGenerator, count: int = 3) -> list:
    rng = np.random.default_rng(1)
    size, n = res.preset.tokenizer.image_size, res.preset.ecg.window_samples
    requests = []
    for i in range(count):
        loop = rng.integers(0, 256, (res.preset.tokenizer.frames, size, size), dtype=np.uint8)
        valid = np.arange(n) < n - 50 * i  # rows past the first lose the window's end: the masked layout
        requests.append(BeatRequest(res.prime_loop(loop, seed=i), rng.standard_normal((1, n)).astype(np.float32), valid, 0.8, 0.0, seed=i))
    return res.generate(requests)


def test_attention_preference_is_a_speed_choice_only() -> None:
    """A preferred SDPA backend that cannot run a shape (or this device) falls through to one
    that can; the beats are the same."""
    torch.set_num_threads(1)
    gen = Generator.untrained(_greedy("small"), device="cpu", seed=2)
    want = _greedy_beats(ResidentGenerator(gen))
    for attention in ("flash", "cudnn", "efficient"):
        got = _greedy_beats(ResidentGenerator(gen, attention=attention))
        assert all(np.array_equal(a.tokens, b.tokens) and np.array_equal(a.frames, b.frames) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="attention"):
        ResidentGenerator(gen, attention="fastest")


def test_compiled_body_gives_the_same_beats_with_rows_shrinking_every_step() -> None:
    """torch.compile of the beat's models: the sampled rows change shape every step, and
    one dynamic-shape compile serves every step; the greedy beats do not change."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    gen = Generator.untrained(_greedy("small"), device="cpu", seed=2)
    want = _greedy_beats(ResidentGenerator(gen), count=2)
    got = _greedy_beats(ResidentGenerator(gen, compile=True), count=2)
    # on CPU the body alone (the GPU test covers the rest), once for all the shrinking rows;
    # here twice, because the first step's 32 rows equal the model width and duck sizing
    # makes them one static size (paper, tiny: no clash)
    assert counters["stats"]["unique_graphs"] <= 2
    for a, b in zip(got, want):
        assert (a.tokens == b.tokens).mean() >= 0.95  # Inductor's fused arithmetic may round differently
        assert np.abs(a.frames.astype(int) - b.frames).mean() < 8


def test_the_cpu_path_never_imports_cupy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "import echopulse.kernels.cupy_kernels, echopulse.kernels.cuda_graph, echopulse.stream.batching\n"
        "from echopulse.core.config import Preset, TokenizerConfig, EcgEncoderConfig, TransformerConfig\n"
        "from echopulse.core.generator import Generator\n"
        "from echopulse.core.resident import ResidentGenerator\n"
        "p = Preset('t', TokenizerConfig(frames=3, image_size=16, dim=16, spatial_depth=1, temporal_depth=1, heads=1,"
        " dim_head=16, lfq_bits=4), EcgEncoderConfig(dim=16, depth=1, heads=1, dim_head=16),"
        " TransformerConfig(dim=16, depth=1, heads=1, dim_head=16, steps=2))\n"
        "r = ResidentGenerator(Generator.untrained(p, device='cpu'), precision='bf16')\n"
        "r.run(r.buffers(1, 1))\n"
        "print('cupy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_sampling_settings_change_in_place() -> None:
    p = small_preset()
    gen = Generator.untrained(p, device="cpu", seed=5)
    res = ResidentGenerator(gen)
    temperature = res.schedule.temperature
    requests = _requests(res, 2)
    before = res.generate(clone_states(requests))
    res.set_sampling(temperature=0.0, confidence_noise=0.0, cfg_scale=0.0)
    assert res.schedule.temperature is temperature  # same tensor: a captured graph sees the change
    after = res.generate(clone_states(requests))
    p.transformer = dataclasses.replace(p.transformer, temperature=0.0, confidence_noise=0.0, cfg_scale=0.0)
    fresh = ResidentGenerator(Generator.untrained(p, device="cpu", seed=5)).generate(clone_states(requests))
    assert any(not np.array_equal(a.tokens, b.tokens) for a, b in zip(before, after))
    for a, b in zip(after, fresh):
        assert np.array_equal(a.tokens, b.tokens)


class _HostTensorSpy(TorchDispatchMode):
    """Records every op that reads a tensor on the CPU while the model runs on another device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        flat = [*args, *(kwargs or {}).values()]
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat):
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["masked", "dense", "no_ref"])
def test_the_pipeline_has_no_host_sync_so_it_can_be_captured(layout: str) -> None:
    """The meta device refuses every data-dependent host operation (.item(), nonzero,
    boolean indexing, a branch on a value): the whole beat runs there, so the same code
    can be recorded into a CUDA graph. No op may read a host tensor either: in a capture
    its value would be frozen into the graph, or its copy refused."""
    gen = Generator.untrained(small_preset(), device="cpu")
    for module in (gen.tokenizer, gen.ecg_encoder, gen.transformer):
        module.to("meta")
    gen.device = torch.device("meta")
    res = ResidentGenerator(gen)
    buf = res.buffers(3, 2)
    spy = _HostTensorSpy()
    with torch.inference_mode(), spy:
        res.pipeline(buf, layout=layout)
    assert not spy.ops, f"host tensors read inside the pipeline by {sorted(spy.ops)}"
    assert buf.frames.device.type == "meta" and buf.frames.shape == (3, 4, 32, 32)
    assert res.unknown_counts[0] == res.transformer.num_tokens - res.transformer.prime_tokens


@pytest.mark.parametrize("priming,layout", [("loop", "dense"), ("image", "no_ref")])
def test_the_cheaper_key_layout_changes_no_beat(priming: str, layout: str) -> None:
    """A beat whose keys are all valid (or whose reference block is all masked) runs the
    cheaper layout, with the tokens and frames of the masked layout."""
    gen = Generator.untrained(_greedy("small"), device="cpu", seed=3)
    res = ResidentGenerator(gen)
    rng = np.random.default_rng(4)
    size, n = gen.preset.tokenizer.image_size, gen.preset.ecg.window_samples
    if priming == "loop":
        state = res.prime_loop(rng.integers(0, 256, (gen.preset.tokenizer.frames, size, size), dtype=np.uint8), seed=0)
    else:
        state = res.prime_image(rng.integers(0, 256, (size, size), dtype=np.uint8), seed=0)
    request = BeatRequest(state, rng.standard_normal((1, n)).astype(np.float32), np.ones(n, bool), 0.8, 0.0, seed=5)
    buf = res.buffers(1, 1)
    res.fill(buf, [request])
    res.run(buf, layout="masked")
    want_tokens, want_frames = buf.ids[0].clone().numpy(), buf.frames[0].clone().numpy()
    with torch.inference_mode():
        context2, _ = res.contexts(buf, layout)
    assert (context2.mask is None) == (layout == "dense")
    seen: list[str] = []
    pipeline = res.pipeline
    res.pipeline = lambda buf, timer=None, layout="masked": (seen.append(layout), pipeline(buf, timer, layout))[1]
    [got] = res.generate(clone_states([request]))
    assert seen == [layout]
    assert np.array_equal(got.tokens, want_tokens)
    assert np.array_equal(got.frames, want_frames)


def _loop_primed(preset_name: str = "small", seed: int = 2) -> tuple[Generator, ResidentGenerator, np.ndarray]:
    gen = Generator.untrained(_greedy(preset_name), device="cpu", seed=seed)
    size, count = gen.preset.tokenizer.image_size, gen.preset.tokenizer.frames
    loop = np.random.default_rng(6).integers(0, 256, (count, size, size), dtype=np.uint8)
    return gen, ResidentGenerator(gen), loop


def test_a_nan_in_the_window_is_missing_data_as_in_the_facade() -> None:
    """The facade turns a NaN (marked valid or not) into a gap; the resident generator must do
    the same, key layout included (a loop-primed device with a whole window runs `dense`)."""
    torch.set_num_threads(1)
    gen, res, loop = _loop_primed()
    n = gen.preset.ecg.window_samples
    rng = np.random.default_rng(7)
    window = rng.standard_normal((1, n)).astype(np.float32)
    window[0, 40] = np.nan  # marked valid
    valid = np.ones(n, bool)
    for invalid_nan in (False, True):
        w, v = window.copy(), valid.copy()
        if invalid_nan:
            w[0, n - 10], v[n - 10] = np.nan, False  # a NaN where nothing was delivered either
        gen.prime_loop(loop)
        want, _ = gen.generate_beat(w, v, 0.0, 0.8)
        [got] = res.generate([BeatRequest(res.prime_loop(loop, seed=0), w, v, 0.8, 0.0, seed=1)])
        assert np.array_equal(got.frames, want)


def test_a_batch_of_mixed_lead_counts_is_refused() -> None:
    """A 1-lead window in a 12-lead batch would be broadcast to 12 copies labelled leads I..V6."""
    gen, res, loop = _loop_primed()
    n = gen.preset.ecg.window_samples
    rng = np.random.default_rng(8)
    twelve = BeatRequest(res.prime_loop(loop, seed=0), rng.standard_normal((12, n)).astype(np.float32), np.ones(n, bool), 0.8, 0.0, seed=1)
    one = BeatRequest(res.prime_loop(loop, seed=1), rng.standard_normal((1, n)).astype(np.float32), np.ones(n, bool), 0.8, 0.0, seed=2)
    with pytest.raises(ValueError, match="leads"):
        res.generate([twelve, one])


def test_rr_must_be_positive_and_finite_as_in_the_facade() -> None:
    gen, res, loop = _loop_primed()
    n = gen.preset.ecg.window_samples
    window = np.zeros((1, n), np.float32)
    for rr in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rr must be positive"):
            res.generate([BeatRequest(res.prime_loop(loop, seed=0), window, np.ones(n, bool), rr, 0.0, seed=1)])


def test_reference_loops_of_the_wrong_kind_are_refused_before_resampling() -> None:
    """As in `Generator.prime_loop`: a float loop resampled first would become near-black uint8."""
    _, res, loop = _loop_primed()
    for bad in (loop.astype(np.float32) / 255, loop[:1], loop[:, :, :-1]):
        for beat_locked in (True, False):
            with pytest.raises(ValueError, match="uint8 frames"):
                res.prime_loop(bad, seed=0, beat_locked=beat_locked)


@pytest.mark.parametrize("call", ["prime_image", "prime_loop", "decode_tokens", "warm_up"])
def test_priming_waits_for_a_batch_in_flight(call: str) -> None:
    """On a GPU a batch size's first beat captures its graph, and another thread's GPU work
    during a capture is an error or lands in the graph: priming, the tokenizer alone and
    warm-up take the generator's lock, as a batch does. Once they ran beside it."""
    import threading

    res = ResidentGenerator(Generator.untrained("tiny", device="cpu", seed=1))
    size, frames = res.preset.tokenizer.image_size, res.preset.tokenizer.frames
    video = np.zeros((frames, size, size), np.uint8)
    calls = {"prime_image": lambda: res.prime_image(video[0], seed=1), "prime_loop": lambda: res.prime_loop(video, seed=1),
             "decode_tokens": lambda: res.decode_tokens(np.zeros((1, res.transformer.num_tokens), np.int64)),
             "warm_up": lambda: res.warm_up(layouts=("dense",))}
    started, done = threading.Event(), threading.Event()
    encode, buffers = res.tokenizer.encode, res.buffers
    res.tokenizer.encode = lambda *a, **k: (started.set(), encode(*a, **k))[1]
    res.buffers = lambda *a, **k: (started.set(), buffers(*a, **k))[1]
    with res._lock:  # a batch in flight
        worker = threading.Thread(target=lambda: (calls[call](), done.set()), daemon=True)
        worker.start()
        assert not started.wait(0.3)  # no model or buffer touched meanwhile
    assert done.wait(30.0) and started.is_set()


@pytest.mark.parametrize("call", ["set_sampling", "drop_graphs"])
def test_changing_the_schedule_or_graphs_waits_for_a_batch_in_flight(call: str) -> None:
    """The schedule tensors are read by every step of a beat (a captured graph reads them by
    address) and the graphs' memory pools hold a beat's tensors: a thread changing them
    took no lock, so a beat in flight could mix two settings or lose its graph's pool."""
    import threading

    res = ResidentGenerator(Generator.untrained("tiny", device="cpu", seed=1))
    res.graphs = sentinel = object()  # stands in for a GraphCache (CPU: none)
    temperature = res.schedule.temperature.clone()
    calls = {"set_sampling": lambda: res.set_sampling(0.1, 0.0, 1.0), "drop_graphs": res.drop_graphs}
    done = threading.Event()
    with res._lock:  # a batch in flight
        worker = threading.Thread(target=lambda: (calls[call](), done.set()), daemon=True)
        worker.start()
        assert not done.wait(0.3)
        assert torch.equal(res.schedule.temperature, temperature) and res.graphs is sentinel
    assert done.wait(30.0)
    assert not torch.equal(res.schedule.temperature, temperature) if call == "set_sampling" else res.graphs is not sentinel
