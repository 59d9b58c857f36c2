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
    for stage in ("tokenizer", "eval-tokenizer", "transformer", "critic", "eval-generator"):
        assert (out / f"done-{stage}").exists(), stage
    tok = json.loads((out / "tokenizer-eval.json").read_text())
    assert tok["clips"] == 2 and 0 <= tok["ssim"] <= 1
    gen = json.loads((out / "generator-eval.json").read_text())
    assert gen["checkpoint"] == str(out / "generator") and gen["device"] == "cpu"
    # the generator trained on the new tokenizer's tokens carries that tokenizer
    assert (out / "generator" / "tokenizer.json").exists() and (out / "generator" / "critic.json").exists()
    again = retrain(out)
    assert again.returncode == 0
    assert again.stdout.count("done before, skipped") == 5


def test_retrain_runs_the_stages_asked_for_and_stops_at_a_failure(tmp_path):
    out = tmp_path / "retrain"
    only = retrain(out, STAGES="eval-tokenizer")
    # nothing trained yet: the evaluation has no tokenizer to load, fails, and marks nothing done
    assert only.returncode != 0
    assert not any(out.glob("done-*"))
    assert "tokenizer: not asked for" in only.stdout
