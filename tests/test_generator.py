"""Generator facade: one beat on CPU, two beats with a clean seam, priming modes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from echopulse.core.beat_window import beat_window
from echopulse.core.generator import DEFAULT_WEIGHTS, Generator, beat_locked_clip
from echopulse.core.sampler import make_schedule
from echopulse.core.tokenizer import from_uint8

from echopulse.core.config import Preset, TokenizerConfig

from _generator_fixtures import small_preset


@pytest.fixture()
def gen() -> Generator:
    return Generator.untrained(small_preset(), seed=0)


def _window(g: Generator, r_time: float, rr: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    fs = 500.0
    t = np.arange(int(20 * fs)) / fs
    ecg = np.random.default_rng(seed).normal(size=(1, t.size)) + np.sin(2 * np.pi * t / rr)
    return beat_window(ecg, fs, r_time, g.preset.ecg, available_until=r_time + rr)


def _frame(g: Generator, value: int = 90) -> np.ndarray:
    size = g.preset.tokenizer.image_size
    return np.full((size, size), value, np.uint8)


def test_one_beat_shapes_dtypes_and_times(gen: Generator) -> None:
    gen.prime_image(_frame(gen))
    window, valid = _window(gen, 5.0, 0.8)
    frames, times = gen.generate_beat(window, valid, r_time=5.0, rr=0.8, seed=3)
    f = gen.preset.tokenizer.frames - 1
    size = gen.preset.tokenizer.image_size
    assert frames.shape == (f, size, size) and frames.dtype == np.uint8
    assert times.shape == (f,) and np.allclose(times, 5.0 + np.arange(f) * 0.8 / f)


def test_same_seed_same_beat(gen: Generator) -> None:
    window, valid = _window(gen, 5.0, 0.8)
    gen.prime_image(_frame(gen))
    a, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=11)
    gen.prime_image(_frame(gen))
    b, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=11)
    assert np.array_equal(a, b)


def test_two_beats_have_no_repeated_frame_at_the_seam(gen: Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[torch.Tensor] = []
    primes: list[torch.Tensor] = []
    decode, encode = gen.tokenizer.decode_indices, gen.tokenizer.encode
    monkeypatch.setattr(gen.tokenizer, "decode_indices", lambda ids: decoded.append(decode(ids)) or decoded[-1])
    monkeypatch.setattr(gen.tokenizer, "encode", lambda video: primes.append(video) or encode(video))

    gen.prime_image(_frame(gen))
    r1, rr1, rr2 = 5.0, 0.8, 0.6
    beat1, t1 = gen.generate_beat(*_window(gen, r1, rr1), r_time=r1, rr=rr1, seed=1)
    beat2, t2 = gen.generate_beat(*_window(gen, r1 + rr1, rr2), r_time=r1 + rr1, rr=rr2, seed=2)
    f = gen.preset.tokenizer.frames - 1
    frames = np.concatenate([beat1, beat2])
    times = np.concatenate([t1, t2])
    assert frames.shape[0] == 2 * f
    assert (np.diff(times) > 0).all()
    # each beat emits frames 1..F of its decoded clip, never frame 0 (the prime)
    for beat, video in zip((beat1, beat2), decoded):
        emitted = torch.from_numpy(beat)
        assert emitted.equal((video[0, 0, 1:].clamp(0, 1) * 255).round().to(torch.uint8))
    # beat 2 was primed with exactly the last frame beat 1 emitted (re-encoded alone)
    prime_video = primes[-2]  # the encode after beat 1 (the last one primes beat 3)
    assert prime_video.shape[2] == 1
    assert prime_video[0, 0, 0].equal(from_uint8(beat1[-1:])[0, 0, 0])
    # beat 2 starts at its own R, one frame interval after beat 1's last frame (the prime)
    assert t2[0] == pytest.approx(r1 + rr1) and t2[0] - t1[-1] == pytest.approx(rr1 / f)


def test_prime_loop_sets_reference_context_and_prime(gen: Generator) -> None:
    size = gen.preset.tokenizer.image_size
    count = gen.preset.tokenizer.frames
    loop = np.random.default_rng(0).integers(0, 255, (count, size, size), dtype=np.uint8)
    gen.prime_loop(loop)
    assert bool(gen.state.ref_valid.all())
    window, valid = _window(gen, 5.0, 0.8)
    with_ref, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=4)
    gen.reset()
    assert gen.state.prime is None and not bool(gen.state.ref_valid.any())
    gen.prime_image(loop[-1])
    without_ref, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=4)
    assert not np.array_equal(with_ref, without_ref)  # the reference loop is live context
    # a free-running loop of any length is resampled to the beat-locked layout
    gen.prime_loop(np.repeat(loop[:1], 7, axis=0), beat_locked=False)


def test_a_nan_marked_valid_is_missing_data_not_a_poisoned_beat(gen: Generator) -> None:
    gen.prime_image(_frame(gen))
    window, valid = _window(gen, 5.0, 0.8)
    poisoned = window.copy()
    poisoned[0, 40] = np.nan  # valid there: once every patch embedding became NaN, the clip flat
    holed, hole_valid = window.copy(), valid.copy()
    holed[0, 40], hole_valid[40] = 0.0, False  # what beat_window makes of the same gap
    a, _ = gen.generate_beat(poisoned, valid, 5.0, 0.8, seed=2)
    gen.prime_image(_frame(gen))
    b, _ = gen.generate_beat(holed, hole_valid, 5.0, 0.8, seed=2)
    np.testing.assert_array_equal(a, b)
    for rr in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rr must be positive and finite"):
            gen.generate_beat(window, valid, 5.0, rr)


def test_reference_loops_of_the_wrong_kind_are_refused(gen: Generator) -> None:
    size, count = gen.preset.tokenizer.image_size, gen.preset.tokenizer.frames
    loop = np.random.default_rng(0).integers(0, 255, (count, size, size), dtype=np.uint8)
    for bad in (loop.astype(np.float32) / 255,  # once cast to near-black uint8 by the resampling
                loop[:1], loop[:, :, :-1], loop[0]):
        for beat_locked in (True, False):
            with pytest.raises(ValueError, match="a reference loop is uint8 frames"):
                gen.prime_loop(bad, beat_locked=beat_locked)


def test_beat_locked_clip_phases() -> None:
    cycle = np.arange(10, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2) * 10
    clip = beat_locked_clip(cycle, 11)
    # frame 0 = the previous beat's last frame (phase 0.9), frames 1..10 = phases 0..0.9
    assert clip[0, 0, 0] == 90 and list(clip[1:, 0, 0]) == list(range(0, 100, 10))


@pytest.mark.skipif(not (DEFAULT_WEIGHTS / "transformer.json").is_file(), reason="shipped tiny model not built yet")
def test_shipped_model_generates_one_beat_on_cpu() -> None:
    gen = Generator.load()
    size = gen.preset.tokenizer.image_size
    gen.prime_image(np.full((size, size), 60, np.uint8))
    window, valid = _window(gen, 5.0, 0.8)
    frames, times = gen.generate_beat(window, valid, 5.0, 0.8, seed=0)
    assert frames.shape == (gen.frames_per_beat, size, size) and frames.dtype == np.uint8
    assert len(times) == gen.frames_per_beat


def test_states_keep_streams_apart(gen: Generator) -> None:
    """One resident model, two devices: each stream continues from its own last frame."""
    window, valid = _window(gen, 5.0, 0.8)
    a, b = gen.new_state(), gen.new_state()
    gen.prime_image(_frame(gen, 40), state=a)
    gen.prime_image(_frame(gen, 200), state=b)
    gen.generate_beat(window, valid, 5.0, 0.8, seed=1, state=a)
    gen.generate_beat(window, valid, 5.0, 0.8, seed=1, state=b)
    second_a, _ = gen.generate_beat(window, valid, 5.8, 0.8, seed=2, state=a)
    solo = gen.new_state()
    gen.prime_image(_frame(gen, 40), state=solo)
    gen.generate_beat(window, valid, 5.0, 0.8, seed=1, state=solo)
    assert np.array_equal(gen.generate_beat(window, valid, 5.8, 0.8, seed=2, state=solo)[0], second_a)


def test_unprimed_stream_starts_from_the_standard_subject() -> None:
    small = small_preset()
    tok = TokenizerConfig(dim=32, spatial_depth=1, temporal_depth=1, heads=2, dim_head=16, lfq_bits=6)  # 64 px, as simulated
    gen = Generator.untrained(Preset(name="t64", tokenizer=tok, ecg=small.ecg, transformer=small.transformer))
    window, valid = _window(gen, 5.0, 0.8)
    frames, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=0)
    assert frames.shape[0] == gen.frames_per_beat and gen.state.prime is not None


def test_sampling_settings_change_the_schedule_and_are_checked(gen: Generator) -> None:
    window, valid = _window(gen, 5.0, 0.8)
    gen.prime_image(_frame(gen))
    before, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=11)
    gen.set_sampling(steps=2, cfg_scale=1.0)
    assert gen.preset.transformer.steps == 2 and gen.schedule.n_masked.shape == (2,)
    assert float(gen.schedule.cond_scale) == 1.0
    assert gen.preset.transformer.temperature == small_preset().transformer.temperature  # None keeps a setting
    gen.prime_image(_frame(gen))
    after, _ = gen.generate_beat(window, valid, 5.0, 0.8, seed=11)
    assert not np.array_equal(before, after)
    with pytest.raises(ValueError, match="steps"):
        gen.set_sampling(steps=0)
    with pytest.raises(ValueError, match=">= 0"):
        gen.set_sampling(temperature=-1.0)


def test_lead_ids_must_name_every_lead_of_the_window(gen: Generator) -> None:
    """One lead id for a 3-lead window was broadcast: all three leads labelled the same lead."""
    gen.prime_image(_frame(gen))
    n = gen.preset.ecg.window_samples
    window = np.random.default_rng(0).standard_normal((3, n)).astype(np.float32)
    for lead_ids in ([4], [0, 1]):
        with pytest.raises(ValueError, match="lead_ids"):
            gen.generate_beat(window, np.ones(n, bool), 5.0, 0.8, seed=0, lead_ids=lead_ids)
    with pytest.raises(ValueError, match="lead_ids"):  # no lead embedding for a 13th lead
        gen.generate_beat(window, np.ones(n, bool), 5.0, 0.8, seed=0, lead_ids=[0, 1, 12])
    a, _ = gen.generate_beat(window, np.ones(n, bool), 5.0, 0.8, seed=0, lead_ids=np.array([0, 1, 2]))
    gen.prime_image(_frame(gen))
    b, _ = gen.generate_beat(window, np.ones(n, bool), 5.0, 0.8, seed=0)
    assert np.array_equal(a, b)  # the default is 0..L-1


def test_sampling_settings_and_prime_images_are_checked_where_they_are_given():
    gen = Generator.default()
    for bad in (float("nan"), float("inf"), -1.0):  # NaN passed a `< 0` check and made every logit NaN
        with pytest.raises(ValueError, match="finite and >= 0"):
            gen.set_sampling(cfg_scale=bad)
        with pytest.raises(ValueError, match="finite and >= 0"):
            make_schedule(6, 320, bad, 1.0, 1.5)
    size = gen.preset.tokenizer.image_size
    loop = np.zeros((11, size, size), np.uint8)
    with pytest.raises(ValueError, match="one uint8 frame"):
        gen.prime_image(loop)  # a loop is not an image: said now, not at the next beat
    with pytest.raises(ValueError, match="one uint8 frame"):
        gen.prime_image(loop[0].astype(np.float32))
    gen.prime_image(torch.from_numpy(loop[0]))  # a uint8 tensor is an image too
