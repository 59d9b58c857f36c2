"""The GPU benchmark's code runs on CPU too (tiny preset), so it cannot rot between the
rare sessions that have a GPU; `run.py --gpu-only` keeps only stages with a GPU part and
stops at once without a GPU; what a run measured survives a stage that fails or a run cut short."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generator  # noqa: E402
import bench_tokenizer  # noqa: E402


def _run_module() -> types.ModuleType:
    """benchmarks/run.py under a name of its own (a bare `run` could meet another module)."""
    spec = importlib.util.spec_from_file_location("echopulse_bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_gpu_comparison_runs_end_to_end_on_cpu() -> None:
    handed: list[int] = []
    rows, raw = bench_generator.gpu_part(quick=True, device="cpu", preset="tiny",
                                         progress=lambda r, x: handed.append(len(r)) or json.dumps(x))
    assert "errors" not in raw, raw.get("errors")
    assert handed and handed == sorted(handed) and handed[-1] == len(rows)  # after every section, savable
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run without a CUDA device")
def test_gpu_only_without_a_gpu_stops_with_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--gpu-only", "--only", "tokenizer,generator",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "--gpu-only needs a CUDA device" in line and "benchmarks/gpu.sh" in line
    assert not out.exists()  # no JSON that looks like a GPU run


def test_gpu_only_skips_stages_without_a_gpu_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_module()
    monkeypatch.setattr(run, "cuda_available", lambda: True)  # the stage below never touches it
    out = tmp_path / "bench.json"
    assert run.main(["--quick", "--gpu-only", "--only", "simulate", "--out", str(out)]) == 0
    assert "simulate     (no GPU part: skipped with --gpu-only)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["gpu_only"] is True and result["stages"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-only stages without a CUDA device")
def test_gpu_only_stages_measure_nothing_on_the_cpu() -> None:
    """No CPU timing rows on a --gpu-only run: they would describe the GPU box's CPU."""
    tokenizer = bench_tokenizer.run(quick=True, gpu_only=True)
    assert not any("CPU" in r["metric"] for r in tokenizer["rows"])
    generator = bench_generator.run(quick=True, gpu_only=True)
    assert generator["rows"] == [] and "no CUDA device" in generator["skipped"][0]


def test_a_failing_stage_keeps_what_it_measured_and_the_others_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_module()
    row = {"metric": "first section", "value": 1.5, "unit": "ms", "target": None}
    seen_on_disk = []

    def boom(quick: bool, progress) -> dict:  # noqa: ANN001
        progress({"rows": [row], "raw": {"first": [1.5]}})
        seen_on_disk.append(json.loads(out.read_text())["stages"]["boom"])  # written before the stage ends
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    for name, fn in (("boom", boom), ("fine", lambda quick: {"rows": [{**row, "metric": "fine"}]})):
        monkeypatch.setitem(sys.modules, f"bench_{name}", types.SimpleNamespace(__name__=f"bench_{name}", run=fn))
    monkeypatch.setattr(run, "stages", lambda: ["boom", "fine"])
    out = tmp_path / "bench.json"
    assert run.main(["--only", "boom,fine", "--out", str(out)]) == 1
    assert seen_on_disk[0]["partial"] is True and seen_on_disk[0]["rows"] == [row]
    stages = json.loads(out.read_text())["stages"]
    assert stages["boom"]["rows"] == [row] and stages["boom"]["raw"] == {"first": [1.5]}
    assert "illegal memory access" in stages["boom"]["error"] and "Traceback" in stages["boom"]["traceback"]
    assert stages["fine"]["rows"][0]["metric"] == "fine" and "error" not in stages["fine"]


def test_every_gpu_section_hands_its_rows_on_even_when_it_fails() -> None:
    rows: list[dict] = []
    raw: dict = {}
    handed = []
    with bench_generator._guarded(rows, raw, "paper beat", progress=lambda r, x: handed.append((list(r), dict(x)))):
        rows.append(bench_generator._row("paper beat p50", 21.4, "ms"))
    with bench_generator._guarded(rows, raw, "paper capture", progress=lambda r, x: handed.append((list(r), dict(x)))):
        raise RuntimeError("operation not permitted when stream is capturing")
    assert [r["metric"] for r in handed[0][0]] == ["paper beat p50"]
    assert [r["metric"] for r in handed[1][0]] == ["paper beat p50", "paper capture: FAILED"]
    assert "stream is capturing" in handed[1][1]["errors"]["paper capture"]

    def broken(r: list, x: dict) -> None:
        raise OSError("disk full")

    with bench_generator._guarded(rows, raw, "paper batch 2", progress=broken):  # a save that fails stops nothing
        rows.append(bench_generator._row("paper batch 2 p50", 30.0, "ms"))
    assert rows[-1]["metric"] == "paper batch 2 p50"


def test_the_json_names_the_code_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_module()
    monkeypatch.setenv("ECHOPULSE_COMMIT", "abc1234")
    info = run.machine_info()
    assert info["commit"] == "abc1234" and info["commit_source"] == "ECHOPULSE_COMMIT"
    for key in ("cupy_version", "torch_version", "torch_cuda", "gpu", "source_sha256"):
        assert key in info
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "a.py").write_text("x = 1\n")
    before = run.source_sha256(tmp_path, ("core",))
    (tmp_path / "core" / "a.py").write_text("x = 2\n")
    assert run.source_sha256(tmp_path, ("core",)) != before  # an uncommitted edit is seen
    monkeypatch.delenv("ECHOPULSE_COMMIT")
    assert run.commit_info()["commit_source"] in ("git", None)
