"""`echopulse demo` end to end: engine → ZeroMQ publisher → subscriber → files a person opens."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.network


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "echopulse.stream.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_demo_writes_video_sheet_plot_and_summary(tmp_path: Path) -> None:
    out = run_cli("demo", "--out", "demo", "--seconds", "8", "--speed", "0", "--backend", "sim", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "demo"
    summary = json.loads((folder / "summary.json").read_text())
    # 8 s at 72 bpm: about 9 R peaks, beats are emitted once the next R is seen.
    assert 6 <= summary["beats"] <= 10
    assert summary["frames"] == 10 * summary["beats"]
    assert summary["frames_lost"] == 0
    assert 65 < summary["heart_rate_bpm_mean"] < 80
    assert summary["beat_to_last_frame_latency"]["p50_ms"] > 0

    import imageio.v2 as imageio

    reader = imageio.get_reader(folder / "demo.mp4")
    frames = [f for _, f in zip(range(40), reader)]
    reader.close()
    assert len(frames) == 40
    assert frames[0].shape[1] == 256 and frames[0].shape[0] > 256  # echo above, ECG strip below
    # The echo moves: frames a beat apart are not all alike.
    echo = np.stack([f[:256].mean(axis=2) for f in frames])
    assert np.abs(np.diff(echo, axis=0)).mean() > 1.0

    from PIL import Image

    for name in ("contact_sheet.png", "lv_area.png"):
        with Image.open(folder / name) as img:
            assert img.width > 200 and img.height > 100
    assert (folder / "data").is_dir()  # the raw ECG the engine persisted


def test_demo_replays_a_recording(tmp_path: Path) -> None:
    from echopulse.core.simulate import simulate_ecg

    record = simulate_ecg(8.0, fs=500.0, hr=90.0, seed=3)
    np.savetxt(tmp_path / "ecg.csv", record.signal[0], fmt="%.5f")
    out = run_cli("demo", "--out", "d", "--file", "ecg.csv", "--fs", "500", "--speed", "0", "--backend", "sim", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert 80 < summary["heart_rate_bpm_mean"] < 100


def test_demo_bad_file_is_one_line(tmp_path: Path) -> None:
    out = run_cli("demo", "--file", "missing.csv", cwd=tmp_path)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "echopulse-demo").exists()


@pytest.mark.slow
def test_demo_with_a_patients_echo_loop(tmp_path: Path) -> None:
    from echopulse.core.simulate.paired import simulate_pair

    sample = simulate_pair(seed=5, size=64, frames=60, fps=30.0, ef=30.0)
    np.savez(tmp_path / "echo.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    out = run_cli("demo", "--out", "d", "--seconds", "5", "--speed", "0", "--backend", "model", "--reference", "echo.npz",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "primed with the patient's echo" in out.stdout
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["prime"] == "reference"
    bad = run_cli("demo", "--out", "e", "--backend", "model", "--reference", "none.mp4", cwd=tmp_path)
    assert bad.returncode == 2 and "none.mp4: no such file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_a_second_run_into_the_same_folder_shows_only_its_own_ecg(tmp_path: Path) -> None:
    """The engine appends to a device's raw store: a second demo into the same --out once
    drew the first run's ECG under its echo (and summed both runs' seconds)."""
    from echopulse.core.simulate import simulate_ecg

    record = simulate_ecg(10.0, fs=250.0, hr=90.0, seed=3)
    np.savetxt(tmp_path / "ecg.csv", record.signal[0], fmt="%.5f")
    base = ("demo", "--out", "d", "--file", "ecg.csv", "--fs", "250", "--speed", "0", "--backend", "sim")
    for extra, seconds in (((), 10.0), (("--seconds", "4"), 4.0)):  # --seconds cuts a recording
        out = run_cli(*base, *extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        summary = json.loads((tmp_path / "d" / "summary.json").read_text())
        assert summary["ecg_seconds"] == pytest.approx(seconds, abs=0.3)


@pytest.mark.parametrize("argv, words", [
    (("--file", "ecg.csv"), "sample rate unknown"),  # the reader's own line, not a traceback
    (("--out", "afile"), "--out afile: not a folder"),
])
def test_demo_mistakes_are_one_line(tmp_path: Path, argv, words) -> None:
    np.savetxt(tmp_path / "ecg.csv", np.zeros(2500), fmt="%.1f")
    (tmp_path / "afile").write_text("x")
    out = run_cli("demo", "--speed", "0", "--backend", "sim", *argv, cwd=tmp_path)
    assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
