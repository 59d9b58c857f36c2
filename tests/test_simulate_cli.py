"""`echopulse simulate`: bad arguments exit 2 with one line and write nothing; a good run
writes index.json, one .npz per sample and a preview (MP4 + PNG contact sheet)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from echopulse.stream.cli import main


def call(argv: list[str]) -> int:
    try:
        return int(main(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)


@pytest.mark.parametrize(
    "bad",
    [
        ["--n", "0"],
        ["--n", "-3"],
        ["--ef", "4"],
        ["--ef", "95"],
        ["--ef", "high"],
        ["--hr", "29"],
        ["--hr", "201"],
        ["--size", "96"],
        ["--size", "sixty-four"],
        ["--view", "plax"],
        ["--frames", "2"],
        ["--leads", "13"],
        ["--preview", "movie.avi"],
        ["--seed", "-1"],
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(bad: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = call(["simulate", "--out", str(out), *bad])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_simulate_writes_index_samples_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "data"
    preview = tmp_path / "preview" / "clip.mp4"
    rc = call(["simulate", "--n", "2", "--size", "64", "--frames", "11", "--seed", "9", "--leads", "2",
               "--out", str(out), "--preview", str(preview)])
    assert rc == 0
    index = json.loads((out / "index.json").read_text())
    assert index["args"]["n"] == 2 and index["args"]["seed"] == 9
    assert [s["seed"] for s in index["samples"]] == [9, 10]
    for entry in index["samples"]:
        with np.load(out / entry["file"]) as z:
            assert z["video"].dtype == np.uint8 and z["video"].shape == (11, 64, 64)
            assert z["lv_mask"].dtype == np.bool_ and z["lv_mask"].shape == (11, 64, 64)
            assert z["ecg"].dtype == np.float32 and z["ecg"].shape[0] == 2
            assert float(z["ecg_fs"]) == 250.0
            assert z["video_t"].shape == (11,) and z["lv_volume"].shape == (11,)
            assert z["r_peaks"].ndim == 1 and len(z["r_peaks"]) >= 3
            assert abs(float(z["ef"]) - entry["ef"]) < 1e-9
            assert z["ed"].tolist() == entry["ed"] and z["es"].tolist() == entry["es"]
    assert preview.stat().st_size > 1000
    png = preview.with_suffix(".png")
    assert png.stat().st_size > 1000
    import imageio_ffmpeg

    n_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(preview))
    reader = imageio_ffmpeg.read_frames(str(preview))
    try:
        width, height = next(reader)["size"]
    finally:
        reader.close()
    assert n_frames > 11
    assert height > width  # the echo above, the ECG strip below


def test_an_interrupted_run_indexes_the_samples_it_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import echopulse.core.simulate as simulate

    real = simulate.iter_pairs

    def interrupted(*args, **kwargs):
        for k, sample in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt  # Ctrl-C after two samples
            yield sample

    monkeypatch.setattr(simulate, "iter_pairs", interrupted)
    out = tmp_path / "data"
    assert main(["simulate", "--n", "5", "--out", str(out)]) == 130
    index = json.loads((out / "index.json").read_text())  # once written only at the end
    assert [s["file"] for s in index["samples"]] == ["sample_00000000.npz", "sample_00000001.npz"] and not index["complete"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "sample_00000000.npz", "sample_00000001.npz"]  # no half file


def test_sigterm_also_indexes_the_samples_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler's stop (SIGTERM) once left no index.json: only Ctrl-C unwound the run."""
    import os
    import signal

    import echopulse.core.simulate as simulate

    real = simulate.iter_pairs

    def stopped(*args, **kwargs):
        for k, sample in enumerate(real(*args, **kwargs)):
            if k == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield sample

    monkeypatch.setattr(simulate, "iter_pairs", stopped)
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--n", "5", "--out", str(out)])
    assert exit_.value.code == 128 + signal.SIGTERM
    index = json.loads((out / "index.json").read_text())
    assert [s["file"] for s in index["samples"]] == ["sample_00000000.npz"] and not index["complete"]
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["simulate", "--n", "1", "--out", str(tmp_path / "file" / "sim")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
