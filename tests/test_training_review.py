"""Training and evaluation commands, from review: a refused run leaves the old one intact, a
resume keeps its settings, an interrupted last checkpoint resumes, outputs are checked
before the work (each failed before its fix)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from echopulse.core import train_generator
from echopulse.core.checkpoint import load_json
from echopulse.core.errors import CheckpointError
from echopulse.core.tokenizer import CViViT, save_tokenizer
from echopulse.core.train_generator import Recipe, train_critic, train_transformer
from echopulse.core.config import tiny
from echopulse.core.train_tokenizer import RunPaths, train_tokenizer
from echopulse.stream.cli import main

from _generator_fixtures import one_thread, small_preset  # noqa: F401 (a fixture)
from test_tokenizer_training import _recipe
from test_transformer_training import fake_pair


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def generator_run(tmp_path, one_thread):
    """A finished 2-step transformer run on one tokenizer, and another tokenizer beside it."""
    p = small_preset()
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "tok")
    import torch

    torch.manual_seed(1)
    save_tokenizer(CViViT(p.tokenizer), p, tmp_path / "tok2")
    recipe = Recipe(steps=2, batch=2, warmup=1, checkpoint_every=1, train_subjects=4)
    train_transformer(p, recipe, tmp_path / "gen", tmp_path / "tok", pairs=fake_pair)
    return p, recipe, tmp_path


def test_a_new_run_over_an_old_one_is_refused_before_it_touches_it(generator_run):
    p, recipe, root = generator_run
    before = {name: digest(root / "gen" / name) for name in ("tokenizer.safetensors", "pairs.npz")}
    with pytest.raises(FileExistsError, match="already holds a run"):
        train_transformer(p, recipe, root / "gen", root / "tok2", pairs=fake_pair)
    assert {name: digest(root / "gen" / name) for name in before} == before  # once overwritten by tok2's


def test_a_resume_keeps_the_runs_settings(generator_run):
    p, recipe, root = generator_run
    changed = Recipe(**{**recipe.__dict__, "steps": 3, "batch": 3, "lr": 0.5})
    with pytest.raises(ValueError, match=r"trained with batch 2 \(now 3\), lr 0.001 \(now 0.5\).*only checkpoint_every"):
        train_transformer(p, changed, root / "gen", root / "tok", resume=True, pairs=fake_pair)
    longer = Recipe(**{**recipe.__dict__, "steps": 3, "checkpoint_every": 5})  # length and checkpoints may change
    train_transformer(p, longer, root / "gen", root / "tok", resume=True, pairs=fake_pair)
    assert load_json(root / "gen" / "transformer.json")["step"] == 3


def test_a_stop_while_the_last_model_files_are_written_resumes_and_writes_them(generator_run, monkeypatch):
    p, recipe, root = generator_run
    real = train_generator.save_transformer

    def stopped(model, preset, directory, name="transformer", **meta):
        if meta.get("step") == 3:
            raise KeyboardInterrupt  # a time limit while the last checkpoint is written
        real(model, preset, directory, name, **meta)

    monkeypatch.setattr(train_generator, "save_transformer", stopped)
    longer = Recipe(**{**recipe.__dict__, "steps": 3})
    with pytest.raises(KeyboardInterrupt):
        train_transformer(p, longer, root / "gen", root / "tok", resume=True, pairs=fake_pair)
    monkeypatch.setattr(train_generator, "save_transformer", real)
    # the state was written after the model files once: "nothing to train", transformer.* left at step 2
    train_transformer(p, longer, root / "gen", root / "tok", resume=True, pairs=fake_pair)
    assert load_json(root / "gen" / "transformer.json")["step"] == 3


def test_a_critic_elsewhere_leaves_the_generators_caches_alone(generator_run):
    p, recipe, root = generator_run
    before = {name: digest(root / "gen" / name) for name in ("pairs.npz", "pairs_raw.npz")}
    train_critic(Recipe(steps=1, batch=2, warmup=1, checkpoint_every=1, train_subjects=6), root / "crit", root / "gen",
                 pairs=fake_pair)
    assert {name: digest(root / "gen" / name) for name in before} == before
    assert (root / "crit" / "pairs.npz").is_file() and (root / "crit" / "critic.json").is_file()


def test_a_truncated_training_state_is_a_checkpoint_error(tmp_path, one_thread):
    recipe = _recipe(steps=1, checkpoint_every=1, log_every=1)
    train_tokenizer(tiny(), recipe, RunPaths(out=tmp_path, data="synthetic"))
    state = tmp_path / "train_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # a copy cut short
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        train_tokenizer(tiny(), _recipe(steps=2, checkpoint_every=1, log_every=1), RunPaths(out=tmp_path, data="synthetic"),
                        resume=True)


@pytest.mark.parametrize("argv, words", [
    (["evaluate", "tokenizer", "--checkpoint", "core/weights/tiny", "--n", "1", "--out", "{tmp}"], "is a folder"),
    (["evaluate", "tokenizer", "--checkpoint", "core/weights/tiny", "--n", "1", "--png", "{tmp}/f.jpgx"], ".png file"),
    (["evaluate", "generator", "--n", "1", "--out", "{tmp}"], "is a folder"),
    (["reference", "{tmp}/loop.npy", "--json", "{tmp}"], "is a folder"),
    (["reference", "{tmp}/loop.npy", "--png", "{tmp}/figure"], ".png file"),
    (["reference", "{tmp}/loop.npy", "--segmenter", "{tmp}/none"], "--segmenter"),
    (["train", "segmenter", "--out", "{tmp}/loop.npy", "--steps", "1", "--subjects", "1"], "not a folder"),
    (["train", "segmenter", "--out", "{tmp}/s", "--size", "63"], "invalid choice"),
    (["train", "ecg", "--out", "{tmp}/e", "--seed", "-1"], "seed must be 0 or more"),
])
def test_outputs_and_arguments_are_checked_before_the_work(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # core/weights/tiny
    np.save(tmp_path / "loop.npy", np.zeros((4, 64, 64), np.uint8))
    try:
        code = main([a.format(tmp=tmp_path) for a in argv])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_a_report_is_written_whole_before_its_figure(tmp_path, monkeypatch):
    """A figure that failed once cost the JSON of a whole evaluation."""
    from echopulse.core import evaluate_tokenizer

    def broken(*args, **kwargs):
        raise RuntimeError("no figure today")

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(evaluate_tokenizer, "comparison_png", broken)
    report = tmp_path / "eval.json"
    with pytest.raises(RuntimeError, match="no figure today"):
        main(["evaluate", "tokenizer", "--checkpoint", "core/weights/tiny", "--n", "1", "--data", "synthetic",
              "--out", str(report), "--png", str(tmp_path / "f.png")])
    assert json.loads(report.read_text())["checkpoint"] == "core/weights/tiny"
    assert not list(tmp_path.glob(".*partial"))
