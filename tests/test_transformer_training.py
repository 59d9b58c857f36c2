"""Training plumbing: pair cache, `train_transformer` / `train_critic` runs that resume and
leave a directory `Generator.load` can use (tiny dims, fake pairs: no simulator needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from echopulse.core.checkpoint import load_json, load_tensors, save_json

from echopulse.core.config import Preset
from echopulse.core.data_pairs import PairCache, PairSample
from echopulse.core.generator import Generator, file_sha256
from echopulse.core.tokenizer import CViViT, load_tokenizer, save_tokenizer
from echopulse.core.train_generator import Recipe, export_generator, train_critic, train_transformer

from _generator_fixtures import one_thread, small_preset  # noqa: F401 (a fixture)


def fake_pair(seed: int, preset: Preset) -> PairSample:
    rng = np.random.default_rng(seed)
    tok = preset.tokenizer
    clip = rng.integers(0, 255, (tok.frames, tok.image_size, tok.image_size), dtype=np.uint8)
    window = rng.normal(size=(2, preset.ecg.window_samples)).astype(np.float32)
    valid = np.arange(preset.ecg.window_samples) < preset.ecg.window_samples * 0.7
    reference = None if seed % 2 else clip[::-1].copy()
    return PairSample(clip, window, valid, 0.7 + 0.01 * seed, 55.0, reference)


def test_pair_cache_roundtrip_and_batches(tmp_path: Path) -> None:
    p = small_preset()
    tokenizer = CViViT(p.tokenizer).eval()
    cache = PairCache.build(tmp_path / "pairs.npz", p, tokenizer, range(6), make=fake_pair, chunk=4)
    again = PairCache.build(tmp_path / "pairs.npz", p, tokenizer, range(6), make=fake_pair)
    assert len(cache) == len(again) == 6
    assert np.array_equal(cache.arrays["tokens"], again.arrays["tokens"])
    assert cache.indices(3, 4).tolist() == cache.indices(3, 4).tolist()  # a function of the step
    b = cache.batch(np.array([0, 1]), leads=1)
    assert b.tokens.shape == (2, p.tokenizer.num_tokens) and b.window.shape == (2, 1, p.ecg.window_samples)
    assert b.ref_valid.tolist() == [True, False]


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path: Path, one_thread) -> None:
    p = small_preset()
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "tok")
    recipe = Recipe(steps=4, batch=2, warmup=1, checkpoint_every=2, log_every=1, train_subjects=4, ecg_lr_scale=1.0)
    train_transformer(p, recipe, tmp_path / "straight", tmp_path / "tok", pairs=fake_pair)
    train_transformer(p, Recipe(**{**recipe.__dict__, "steps": 2}), tmp_path / "cut", tmp_path / "tok", pairs=fake_pair)
    train_transformer(p, recipe, tmp_path / "cut", tmp_path / "tok", resume=True, pairs=fake_pair)
    for part in ("transformer", "ecg"):  # the ECG encoder's average once restarted from the raw weights on resume
        a, b = (load_tensors(tmp_path / run / f"{part}.safetensors") for run in ("straight", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_pairs_of_another_tokenizer_are_not_trained_on(tmp_path: Path) -> None:
    p = small_preset()
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "tok")
    torch.manual_seed(1)
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "other")  # other weights: other tokens
    recipe = Recipe(steps=1, batch=2, warmup=1, checkpoint_every=1, train_subjects=4)
    train_transformer(p, recipe, tmp_path / "gen", tmp_path / "tok", pairs=fake_pair)
    recipe.steps = 2
    with pytest.raises(ValueError, match="makes other tokens than the one"):
        train_transformer(p, recipe, tmp_path / "gen", tmp_path / "other", resume=True, pairs=fake_pair)
    # a cache left by another tokenizer is re-tokenized, not reused (an interrupted run's pairs.npz)
    tokens = PairCache.build(tmp_path / "gen" / "pairs.npz", p, load_tokenizer(tmp_path / "other")[0], range(4), make=fake_pair,
                             token_space="another").arrays
    stale = np.load(tmp_path / "gen" / "pairs.npz")
    assert str(stale["token_space"]) == "another"
    mine = load_tokenizer(tmp_path / "tok")[0]
    again = PairCache.build(tmp_path / "gen" / "pairs.npz", p, mine, range(4), make=fake_pair, token_space="mine").arrays
    assert str(again["token_space"]) == "mine" and not np.array_equal(again["tokens"], tokens["tokens"])


def test_train_resume_and_load_a_generator(tmp_path: Path) -> None:
    p = small_preset()
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "tok")
    out = tmp_path / "gen"
    recipe = Recipe(steps=2, batch=2, warmup=1, checkpoint_every=2, log_every=1, train_subjects=4)
    train_transformer(p, recipe, out, tmp_path / "tok", pairs=fake_pair)
    recipe.steps = 3
    train_transformer(p, recipe, out, tmp_path / "tok", resume=True, pairs=fake_pair)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    # a run started from another generator (e.g. after the tokenizer changed) takes its weights
    warm = tmp_path / "warm"
    train_transformer(p, Recipe(steps=1, batch=2, warmup=1, checkpoint_every=1, train_subjects=4, lr=1e-9), warm,
                      tmp_path / "tok", pairs=fake_pair, init=out)
    before = load_tensors(out / "transformer.safetensors")["pos_t"]
    assert torch.allclose(load_tensors(warm / "transformer.safetensors")["pos_t"], before, atol=1e-5)
    train_critic(Recipe(steps=1, batch=2, warmup=1, checkpoint_every=1, train_subjects=4), out, out, pairs=fake_pair)
    shipped = tmp_path / "shipped"
    assert export_generator(out, shipped) == ["tokenizer", "ecg", "transformer", "critic"]
    gen = Generator.load(shipped, use_critic=True)  # fp16 files, loaded back into float32 modules
    assert gen.critic is not None and gen.preset.name == "test"
    assert Generator.load(shipped).critic is None  # opt-in
    # a tokenizer whose decoder alone changed makes the same tokens: accepted
    tok, _ = load_tokenizer(shipped)
    with torch.no_grad():
        tok.unembed.first.bias.add_(0.1)
    save_tokenizer(tok, p, shipped, dtype=torch.float16)
    assert not torch.equal(load_tensors(shipped / "tokenizer.safetensors")["unembed.first.bias"],
                           load_tensors(out / "tokenizer.safetensors")["unembed.first.bias"].half())
    Generator.load(shipped)
    # a different tokenizer beside the transformer is refused, not silently mis-decoded
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "other")
    (shipped / "tokenizer.safetensors").write_bytes((tmp_path / "other" / "tokenizer.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not make the tokens the transformer was trained on"):
        Generator.load(shipped)
    # checkpoints from before the encoder-side pin name the whole tokenizer file
    meta = load_json(shipped / "transformer.json")
    del meta["tokenizer_tokens_sha256"]
    save_json({**meta, "tokenizer_sha256": "0" * 64}, shipped / "transformer.json")
    with pytest.raises(ValueError, match="does not make the tokens"):
        Generator.load(shipped)
    save_json({**meta, "tokenizer_sha256": file_sha256(shipped / "tokenizer.safetensors")}, shipped / "transformer.json")
    Generator.load(shipped)
    gen = Generator.load(out)
    gen.prime_image(np.zeros((p.tokenizer.image_size,) * 2, np.uint8))
    frames, times = gen.generate_beat(np.zeros((1, p.ecg.window_samples), np.float32), np.ones(p.ecg.window_samples, bool), 1.0, 0.8)
    assert frames.shape == (p.tokenizer.frames - 1, p.tokenizer.image_size, p.tokenizer.image_size)


def test_train_transformer_on_your_own_paired_clips(tmp_path) -> None:
    """`train transformer --data DIR` reads clips in the `echopulse simulate` layout."""
    import subprocess
    import sys

    from echopulse.core.generator import DEFAULT_WEIGHTS

    data = tmp_path / "mine"
    cli = [sys.executable, "-m", "echopulse.stream.cli"]
    made = subprocess.run([*cli, "simulate", "--n", "3", "--seed", "5", "--out", str(data)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (data / "index.json").unlink()  # the folder needs only the clips
    run = subprocess.run([*cli, "train", "transformer", "--data", str(data), "--tokenizer", str(DEFAULT_WEIGHTS),
                          "--steps", "2", "--batch", "2", "--warmup", "1", "--checkpoint-every", "2", "--threads", "1",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "transformer.json").is_file()
    with np.load(tmp_path / "run" / "pairs.npz") as pairs:
        assert len(pairs["seeds"]) == 3 and not pairs["ref_valid"].any()  # three clips, no reference loops

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run([*cli, "train", "transformer", "--data", str(empty), "--tokenizer", str(DEFAULT_WEIGHTS),
                          "--out", str(tmp_path / "r2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no .npz clips" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_npz_pair_rejects_a_clip_that_does_not_fit(tmp_path) -> None:
    from echopulse.core.config import tiny
    from echopulse.core.data_pairs import npz_pair

    path = tmp_path / "clip.npz"
    np.savez(path, video=np.zeros((5, 64, 64), np.uint8), ecg=np.zeros((1, 2500), np.float32), ecg_fs=250.0,
             r_peaks=np.array([1.0, 2.0]), beat=0)
    with pytest.raises(ValueError, match="video must be uint8 11"):
        npz_pair(path, tiny())


def test_pairs_simulated_in_processes_equal_the_serial_ones(tmp_path: Path) -> None:
    from echopulse.core.config import preset
    from echopulse.core.data_pairs import simulate_pairs

    p = preset("tiny")
    serial = simulate_pairs(tmp_path / "one.npz", p, range(3), workers=1)
    pooled = simulate_pairs(tmp_path / "two.npz", p, range(3), workers=2)
    assert set(serial) == set(pooled)
    for key in serial:
        assert np.array_equal(serial[key], pooled[key]), key
