"""core/weights/retrain.sh: the prepared GPU job (tokenizer encoder, then the generator on
its tokens, then both scored) runs end to end at smoke size, and a second call resumes
past the stages that finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def retrain(out: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "core" / "weights" / "retrain.sh"), str(out)], cwd=ROOT,
                          env={**os.environ, "QUICK": "1", "DEVICE": "cpu", "PYTHON": sys.executable, **env},
                          capture_output=True, text=True, timeout=600)


def test_retrain_runs_every_stage_then_skips_them(tmp_path):
    out = tmp_path / "retrain"
    first = retrain(out)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("tokenizer", "eval-tokenizer", "transformer", "critic", "eval-generator", "verdict"):
        assert (out / f"done-{stage}").exists(), stage
    assert json.loads((out / "generator" / "transformer.json").read_text())["train"]["init"] == "core/weights/tiny"
    verdict = json.loads((out / "verdict.json").read_text())  # a smoke run's weights never ship
    assert verdict["ship"] is False and "tokenizer SSIM" in verdict["failed"]
    assert "keep the shipped weights" in first.stdout
    tok = json.loads((out / "tokenizer-eval.json").read_text())
    assert tok["clips"] == 2 and 0 <= tok["ssim"] <= 1
    gen = json.loads((out / "generator-eval.json").read_text())
    assert gen["checkpoint"] == str(out / "generator") and gen["device"] == "cpu"
    # the generator trained on the new tokenizer's tokens carries that tokenizer
    assert (out / "generator" / "tokenizer.json").exists() and (out / "generator" / "critic.json").exists()
    again = retrain(out)
    assert again.returncode == 0
    assert again.stdout.count("done before, skipped") == 6


def test_retrain_runs_the_stages_asked_for_and_stops_at_a_failure(tmp_path):
    out = tmp_path / "retrain"
    only = retrain(out, STAGES="eval-tokenizer")
    # nothing trained yet: the evaluation has no tokenizer to load, fails, and marks nothing done
    assert only.returncode != 0
    assert not any(out.glob("done-*"))
    assert "tokenizer: not asked for" in only.stdout


def test_gen_init_picks_fine_tuning_or_scratch_and_refuses_anything_else(tmp_path):
    bad = retrain(tmp_path / "r", GEN_INIT="later", STAGES="verdict")
    assert bad.returncode == 2 and "GEN_INIT must be shipped or scratch" in bad.stderr
    out = tmp_path / "s"
    scratch = retrain(out, GEN_INIT="scratch", STAGES="tokenizer transformer")
    assert scratch.returncode == 0, scratch.stdout + scratch.stderr
    train = json.loads((out / "generator" / "transformer.json").read_text())["train"]
    assert train["init"] is None and train["ecg"] == "core/weights/tiny"  # the transformer from scratch
