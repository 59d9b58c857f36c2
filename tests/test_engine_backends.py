"""Backends behind one interface: the sim heart per device, the learned generator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echopulse.bridges.chunk import EcgChunk
from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream import backends
from echopulse.stream.session import EngineLimits, Session


def detected_beats(seconds: float = 5.0, fs: float = 250.0, config=None):
    rec = simulate_ecg(seconds, fs=fs, hr=75.0, seed=4, pvc_rate=0.0)
    s = Session("b", EngineLimits(beat_queue=1000), config=config)
    step = int(0.5 * fs)
    for i, start in enumerate(range(0, rec.signal.shape[1], step)):
        s.ingest(EcgChunk("b", rec.signal[:, start:start + step], fs, start / fs, i))
    return [p.beat for p in s.take_all()]


def test_sim_backend_is_one_heart_per_device_and_reproducible():
    sim = backends.make_backend("sim")
    beat = detected_beats()[0]
    a1, t1 = sim.render(sim.new_state("dev-a"), beat)
    a2, _ = sim.render(sim.new_state("dev-a"), beat)
    b1, _ = sim.render(sim.new_state("dev-b"), beat)
    assert a1.dtype == np.uint8 and a1.shape == (10, 64, 64)
    np.testing.assert_allclose(t1, beat.r_time + beat.rr * np.arange(10) / 10)
    np.testing.assert_array_equal(a1, a2)  # the same device id gets the same heart
    assert not np.array_equal(a1, b1)


def test_device_seed_is_stable():
    assert backends.device_seed("strap-7") == 481422950  # the same in every run (hash() is salted)
    assert backends.device_seed("a") != backends.device_seed("b")


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        backends.make_backend("magic")


def test_default_is_sim_until_a_trained_model_ships():
    assert backends.default_backend() == ("model" if backends.shipped_model() else "sim")


@pytest.mark.slow
def test_model_backend_renders_a_detected_beat():
    if not backends.model_available():
        pytest.skip("core/generator.py not in this installation")
    model = backends.make_backend("model", device="cpu")
    beats = detected_beats(config=model.ecg_config)
    state = model.new_state("dev-a")
    frames, times = model.render(state, beats[0])
    size = model.base.preset.tokenizer.image_size
    assert frames.dtype == np.uint8 and frames.shape == (model.base.frames_per_beat, size, size)
    assert times[0] == pytest.approx(beats[0].r_time) and np.all(np.diff(times) > 0)
    assert model.name.startswith("model:")


@pytest.fixture(scope="module")
def low_ef_loop(tmp_path_factory):
    """One patient's echo as `echopulse simulate --fps 30` writes it: EF 30 %, two beats."""
    from echopulse.core.simulate.paired import simulate_pair

    path = tmp_path_factory.mktemp("loops") / "ef30.npz"
    sample = simulate_pair(seed=5, size=64, frames=60, fps=30.0, ef=30.0)
    np.savez(path, **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    return path


def loop_tokens(path) -> torch.Tensor:
    """The tokens of a reference loop file in the clip layout, as the shipped tokenizer makes them."""
    from echopulse.core.generator import Generator, beat_locked_clip
    from echopulse.core.reference_loop import load_reference_loop

    gen = Generator.default(device="cpu")
    clip = beat_locked_clip(load_reference_loop(path, 64).frames, gen.preset.tokenizer.frames)
    return gen.tokenizer.encode(gen._frames_tensor(clip)).flatten().cpu()


def context_tokens(state, batching: bool) -> torch.Tensor:
    """The reference tokens a model backend holds for a device."""
    return (state["state"].ref_ids if batching else state["generator"].state.ref_ids.flatten()).cpu()


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True])
def test_model_backends_prime_a_device_with_its_patients_loop(low_ef_loop, batching):
    model = backends.make_backend("model", device="cpu", batching=batching, references={"dev-a": str(low_ef_loop)})
    try:
        beat = detected_beats(config=model.ecg_config)[0]
        own, other = model.new_state("dev-a"), model.new_state("dev-b")
        frames_a, _ = model.render(own, beat)
        frames_b, _ = model.render(other, beat)
        assert model.frame_fields(own) == {"prime": "reference"}
        assert model.frame_fields(other) == {"prime": "simulated"}
        assert torch.equal(context_tokens(own, batching), loop_tokens(low_ef_loop))  # its patient's loop
        assert not np.array_equal(frames_a, frames_b)
    finally:
        model.close()


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True])
def test_a_running_device_takes_a_new_loop_at_its_next_beat(tmp_path, low_ef_loop, batching):
    model = backends.make_backend("model", device="cpu", batching=batching)
    try:
        beats = detected_beats(config=model.ecg_config)
        state = model.new_state("dev-a")
        model.render(state, beats[0])
        assert model.frame_fields(state) == {"prime": "simulated"}
        with pytest.raises(ValueError, match="reference for dev-a: .*no such file"):
            model.set_references({"dev-a": str(tmp_path / "none.npz")})
        assert model.references.version("dev-a") == 0 and len(model.references) == 0  # nothing changed
        assert model.set_references({"dev-a": str(low_ef_loop)}) == ["dev-a"]
        assert model.set_references({"dev-a": str(low_ef_loop)}) == []  # the same loop again: no change
        model.render(state, beats[1])
        assert model.frame_fields(state) == {"prime": "reference"}
        assert torch.equal(context_tokens(state, batching), loop_tokens(low_ef_loop))
        # the loop taken away again (a reload without it): back to the device's simulated heart
        assert model.set_references({}) == ["dev-a"]
        model.render(state, beats[2])
        assert model.frame_fields(state) == {"prime": "simulated"}
        assert not torch.equal(context_tokens(state, batching), loop_tokens(low_ef_loop))
        assert model.references.frames("dev-a") is None
    finally:
        model.close()
    with pytest.raises(ValueError, match="the sim backend takes no reference loops"):
        backends.make_backend("sim").set_references({"dev-a": str(low_ef_loop)})


def test_a_device_without_a_loop_names_the_loops_still_waiting(low_ef_loop, caplog):
    """A misspelt device id leaves a loop unused and its patient on a simulated heart: the
    first device that streams without a loop names the loops no device has claimed."""
    refs = backends.ReferenceLoops({"polar-1": str(low_ef_loop), "polar-2": str(low_ef_loop)}, 64)
    assert refs.waiting() == ["polar-1", "polar-2"]
    with caplog.at_level("WARNING", logger="echopulse.stream.backends"):
        refs.seen("polar-1")  # has its loop: nothing to say
        assert not caplog.records
        refs.seen("polar_2")  # the other one, under another id
        refs.seen("polar_2")  # said once per device
    assert refs.waiting() == ["polar-2"]
    assert len(caplog.records) == 1
    assert "polar_2 has no reference loop" in caplog.text and "the loops of polar-2 wait" in caplog.text
    caplog.clear()
    refs.seen("polar-2")
    with caplog.at_level("WARNING", logger="echopulse.stream.backends"):
        refs.seen("polar-3")  # every loop is claimed: a device without one is simply not warned about
    assert refs.waiting() == [] and not caplog.records


def test_references_are_checked_before_anything_serves(tmp_path, low_ef_loop):
    with pytest.raises(ValueError, match="references is for the model backend"):
        backends.make_backend("sim", references={"a": str(low_ef_loop)})
    with pytest.raises(ValueError, match="reference for dev-a: .*none.mp4: no such file"):
        backends.make_backend("model", device="cpu", references={"dev-a": str(tmp_path / "none.mp4")})
    with pytest.raises(ValueError, match="reference for bad id: bad device id"):
        backends.make_backend("model", device="cpu", references={"bad id": str(low_ef_loop)})
    assert backends.make_backend("sim", references={}).name == "sim"  # none given is no reference


@pytest.mark.parametrize("options, words", [
    ({"precision": "bf16"}, "only apply with batching"),
    ({"batch_window_ms": 2.0, "batching": False}, "only apply with batching"),
    ({"batching": True, "cuda_graphs": True}, "need the generator on a CUDA device"),
    ({"batching": True, "batch_window_ms": -1.0}, "batch window"),
    ({"compile": True}, "only apply with batching"),
])
def test_model_options_that_do_not_fit_are_value_errors(options, words):
    with pytest.raises(ValueError, match=words):
        backends.make_backend("model", device="cpu", **options)


def test_another_backends_settings_are_named_not_a_type_error(tmp_path, capsys):
    assert backends.default_backend() == "model"  # the shipped weights
    with pytest.raises(ValueError, match="frames_per_beat: not settings of the model backend"):
        backends.make_backend(None, frames_per_beat=10)  # once TypeError inside ModelBackend
    with pytest.raises(ValueError, match="device: not settings of the sim backend"):
        backends.make_backend("sim", device="cpu")
    # the way a user meets it: a config whose [backend] has sim settings but no name
    from echopulse.stream.cli import main

    config = tmp_path / "echopulse.toml"
    config.write_text(f'sources = ["synthetic://?devices=1"]\ndata_dir = "{tmp_path / "d"}"\n[backend]\nframes_per_beat = 10\n')
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "frames_per_beat" in err


def test_batching_options_are_for_the_model_backend():
    with pytest.raises(ValueError, match="precision is for the model backend"):
        backends.make_backend("sim", precision="bf16")
    assert backends.make_backend("sim", precision=None, batching=None).name == "sim"  # unset options are ignored


@pytest.mark.slow
def test_batched_model_backend_matches_the_resident_generator_and_serves_the_engine():
    from echopulse.stream.batching import BatchingBackend

    batched = backends.make_backend("model", device="cpu", batching=True, batch_window_ms=1.0)
    try:
        assert isinstance(batched, BatchingBackend) and batched.resident.graphs is None  # eager on CPU
        beats = detected_beats(config=batched.ecg_config)
        a = batched.new_state("dev-a")
        frames, times = batched.render(a, beats[0])
        size = batched.resident.preset.tokenizer.image_size
        assert frames.shape == (batched.resident.frames_per_beat, size, size) and frames.dtype == np.uint8
        assert times[0] == pytest.approx(beats[0].r_time)
        # the same device id and beat give the same frames (per-device seeds, as the unbatched backend)
        again, _ = batched.render(batched.new_state("dev-a"), beats[0])
        np.testing.assert_array_equal(frames, again)
    finally:
        batched.close()
    assert not backends.make_backend("model", device="cpu").__class__ is BatchingBackend  # CPU default: unbatched


def test_compile_reaches_the_resident_generator():
    """`compile = true` in [backend] compiles the beat's models (lazily: at the first beat)."""
    backend = backends.make_backend("model", device="cpu", batching=True, compile=True)
    try:
        assert backend.resident.body is not backend.resident.transformer.transformer
        assert backend.resident.body._orig_mod is backend.resident.transformer.transformer
    finally:
        backend.close()


def test_warm_up_batch_makes_those_batch_sizes_ready_before_the_first_beat():
    backend = backends.make_backend("model", device="cpu", batching=True, warm_up_batch=4)
    try:
        assert backend.warm_sizes == (1, 2, 4)
        backend.warm_up()
        assert sorted(backend.resident._buffers) == [(1, 1), (2, 1), (4, 1)]
    finally:
        backend.close()
    for bad in (0, 65):
        with pytest.raises(ValueError, match="warm_up_batch"):
            backends.make_backend("model", device="cpu", batching=True, warm_up_batch=bad)
