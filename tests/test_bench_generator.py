"""The GPU benchmark's code runs on CPU too (tiny preset), so it cannot rot between the
rare sessions that have a GPU; and `run.py --gpu-only` keeps only stages with a GPU part."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generator  # noqa: E402


@pytest.mark.slow
def test_the_gpu_comparison_runs_end_to_end_on_cpu() -> None:
    rows, raw = bench_generator.gpu_part(quick=True, device="cpu", preset="tiny")
    assert "errors" not in raw, raw.get("errors")
    metrics = {r["metric"] for r in rows}
    for label in ("eager fp32", "eager bf16"):
        assert f"paper beat, GPU batch 1, {label} p50" in metrics
    assert any("image-primed (no_ref)" in m for m in metrics) and any("gap-primed (masked)" in m for m in metrics)
    lap = raw["paper_overlapped_replays"]
    assert lap["lanes"] == 2 and lap["beats_per_s"] > 0 and lap["together_p50_ms"] > 0
    trials = raw["paper_load_tests"]
    assert trials and all(t["latency_ends"] == "last frame published" for t in trials)
    assert all(t["frames_received"] == t["frames_expected"] > 0 for t in trials)
    json.dumps(raw)  # what run.py writes


def test_gpu_only_skips_stages_without_a_gpu_part(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--gpu-only", "--only", "simulate,tokenizer,generator",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "no GPU part: skipped with --gpu-only" in proc.stdout
    result = json.loads(out.read_text())
    assert result["gpu_only"] is True
    assert list(result["stages"]) == ["tokenizer", "generator"]
    if not torch.cuda.is_available():  # what was not measured is a note, never a row with a value
        generator = result["stages"]["generator"]
        assert generator["rows"] == [] and "no CUDA device" in generator["skipped"][0]
        assert "(skipped: paper GPU rows: no CUDA device" in proc.stdout
    # no CPU timing rows on a --gpu-only run: they would describe the GPU box's CPU
    assert not any("CPU" in r["metric"] for r in result["stages"]["tokenizer"]["rows"])
