"""Damaged or mismatched checkpoints: one line naming the file, exit status 2, never a traceback."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from echopulse.core.checkpoint import CheckpointError, load_module, load_preset, save_module
from echopulse.core.generator import DEFAULT_WEIGHTS
from echopulse.stream.cli import main

PARTS = ("tokenizer", "ecg", "transformer")


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


DAMAGE = {
    "truncated weights": ("transformer.safetensors", _truncate, "not a readable safetensors file"),
    "field of another version": ("transformer.json",
                                 lambda p: _edit_json(p, lambda d: d["preset"]["transformer"].update(old_knob=1)), "no usable preset"),
    "no preset": ("ecg.json", lambda p: _edit_json(p, lambda d: d.pop("preset")), "no usable preset"),
    "empty json": ("tokenizer.json", lambda p: p.write_text(""), "not valid JSON"),
    "another kind": ("tokenizer.json", lambda p: shutil.copy(p.parent / "critic.json", p), "a critic checkpoint, not a tokenizer"),
    "weights of another width": ("transformer.json",
                                 lambda p: _edit_json(p, lambda d: d["preset"]["transformer"].update(dim=64)), "of another shape"),
    "parts of different models": ("ecg.json",  # a smaller ECG encoder, saved whole: it loads, but the transformer expects 128
                                  lambda p: _edit_json(p, lambda d: d["preset"]["ecg"].update(dim=64)), None),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_generator_checkpoint_is_one_line_and_status_2(tmp_path, capsys, case):
    folder = tmp_path / "gen"
    shutil.copytree(DEFAULT_WEIGHTS, folder)
    name, damage, words = DAMAGE[case]
    damage(folder / name)
    if case == "parts of different models":
        from echopulse.core.config import preset
        from echopulse.core.ecg_encoder import EcgEncoder, save_ecg_encoder

        small = preset("tiny")
        small.ecg.dim = 64
        save_ecg_encoder(EcgEncoder(small.ecg), small, folder)
        words = "ecg.dim is 64, but transformer.json was built for 128"
    assert main(["evaluate", "generator", "--checkpoint", str(folder), "--n", "1", "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and str(folder) in err, err


def test_load_module_names_what_does_not_fit(tmp_path):
    path = tmp_path / "m.safetensors"
    save_module(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), path)
    with pytest.raises(CheckpointError, match=r"3 tensor\(s\) of another shape, e\.g\. 0\.bias: \(8,\) in the file, \(3,\) in the model"):
        load_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), path)
    with pytest.raises(CheckpointError, match=r"tensors 2 unexpected \(e\.g\. 1\.bias\): weights of another model"):
        load_module(nn.Sequential(nn.Linear(4, 8)), path)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    load_module(model, path)  # what fits still loads
    assert model[0].weight.dtype == torch.float32


def test_load_preset_refuses_a_json_array(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="a JSON list, not an object"):
        load_preset(path)


def test_train_tokenizer_init_from_a_truncated_file(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy(DEFAULT_WEIGHTS / f"tokenizer{suffix}", folder)
    _truncate(folder / "tokenizer.safetensors")
    argv = ["train", "tokenizer", "--init", str(folder), "--decoder-only", "--steps", "1", "--batch", "1", "--data", "synthetic",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a readable safetensors file" in err
