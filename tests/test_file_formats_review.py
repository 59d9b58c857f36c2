"""Recorded-ECG files as their makers write them (from a review of the file readers):
each test failed before its fix."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from echopulse.bridges.replay import ReplayError, read_recording


def wave(n: int, fs: float) -> np.ndarray:
    return np.sin(2 * np.pi * 1.2 * np.arange(n) / fs)


# -- plain tables: what happens between the rows of numbers ---------------------------------


def test_a_missing_value_inside_the_body_is_nan_not_the_end_of_the_file(tmp_path: Path) -> None:
    # rdsamp -c writes '-' for an invalid sample; a spreadsheet leaves the cell empty. The
    # reader once kept only the rows after it, and took the row before it for the header.
    x = wave(720, 360.0).round(3)
    rows = [f"{i},{v:.3f},{-v:.3f}" for i, v in enumerate(x)]
    rows[500] = f"500,-,{-x[500]:.3f}"
    rows[600] = f"600,{x[600]:.3f},"
    p = tmp_path / "100.csv"
    p.write_text("'sample #','MLII','V5'\n" + "\n".join(rows) + "\n")
    rec = read_recording(p, fs=360)
    assert rec.leads == ["MLII", "V5"] and rec.samples.shape == (2, 720)
    assert np.isnan(rec.samples[0, 500]) and np.isnan(rec.samples[1, 600])  # the engine marks them invalid
    keep = np.ones(720, bool)
    keep[[500, 600]] = False
    np.testing.assert_allclose(rec.samples[0, keep], x[keep], atol=1e-6)


def test_text_between_the_rows_is_an_error_naming_the_line(tmp_path: Path) -> None:
    rows = [f"{i / 250:.3f},{v:.4f}" for i, v in enumerate(wave(500, 250.0))]
    rows[300] = "1.200,lead off"
    p = tmp_path / "rec.csv"
    p.write_text("time,ecg\n" + "\n".join(rows) + "\n")
    with pytest.raises(ReplayError, match=r"rec\.csv: line 302: '1\.200,lead off'"):
        read_recording(p)


def test_a_last_line_cut_short_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    # a logger stopped mid-write, or a file copied while it was written: once "no numeric samples"
    x = wave(1000, 250.0)
    p = tmp_path / "torn.csv"
    p.write_text("time,I,II\n" + "\n".join(f"{i / 250:.3f},{v:.4f},{-v:.4f}" for i, v in enumerate(x)) + "\n4.000,0.0")
    with caplog.at_level("WARNING"):
        rec = read_recording(p)
    assert rec.fs == 250 and rec.leads == ["I", "II"] and rec.samples.shape == (2, 1000)
    assert "line 1002" in caplog.text


def test_a_spreadsheet_trailing_delimiter_adds_no_lead(tmp_path: Path) -> None:
    # Excel saves every row as wide as the widest: "0.004,0.1234,"
    x = wave(500, 250.0)
    p = tmp_path / "excel.csv"
    p.write_text("time,ecg,\n" + "\n".join(f"{i / 250:.3f},{v:.4f}," for i, v in enumerate(x)) + "\n,,\n")
    rec = read_recording(p)
    assert rec.fs == 250 and rec.leads == ["ecg"]
    np.testing.assert_allclose(rec.samples[0], x, atol=1e-4)
    # an Apple Health export opened and saved in Excel: its "Unit,µV" row now reads as labels
    uv = wave(1024, 512.0) * 800
    head = ["Name,Jane Appleseed", "Recorded Date,2024-03-01 08:15:02 +0100", "Sample Rate,512 hertz", ",", "Lead,Lead I", "Unit,µV", ","]
    q = tmp_path / "ecg_excel.csv"
    q.write_text("\n".join(head + [f"{v:.3f}," for v in uv]) + "\n", encoding="utf-8")
    rec = read_recording(q)
    assert rec.fs == 512
    np.testing.assert_allclose(rec.samples[0], uv * 1e-3, atol=1e-6)  # µV, not mV


# -- exports of named tools ------------------------------------------------------------------


def test_physiobank_atm_samples_csv_with_units_row_and_elapsed_time(tmp_path: Path, caplog) -> None:
    # PhysioBank ATM "samples.csv": labels, then units; time as 'm:ss.mmm'. Once "no numeric
    # samples found"; with seconds in the time column, leads named "mV" and --lead MLII refused.
    fs = 360
    x = wave(720, fs).round(3)
    stamp = [f"'{i // fs // 60}:{(i / fs) % 60:06.3f}'" for i in range(720)]
    p = tmp_path / "samples.csv"
    p.write_text("'Elapsed time','MLII','V5'\n'hh:mm:ss.mmm','mV','uV'\n"
                 + "\n".join(f"{s},{v:.3f},{-v * 1000:.0f}" for s, v in zip(stamp, x)) + "\n")
    rec = read_recording(p)
    assert rec.fs == 360 and rec.leads == ["MLII", "V5"]
    np.testing.assert_allclose(rec.samples, np.stack([x, -x]), atol=1e-6)  # each column in its own unit
    assert read_recording(p, lead="MLII").leads == ["MLII"]
    q = tmp_path / "seconds.csv"
    q.write_text("'Elapsed time','II','ABP'\n'seconds','mV','mmHg'\n"
                 + "\n".join(f"{i / fs:.3f},{v:.3f},{90 + 20 * v:.1f}" for i, v in enumerate(x)) + "\n")
    with caplog.at_level("WARNING"):
        rec = read_recording(q)
    assert rec.fs == 360 and rec.leads == ["II"] and "ABP (mmHg)" in caplog.text  # as WFDB records do


def test_polar_sensor_logger_ecg_txt(tmp_path: Path) -> None:
    # Polar Sensor Logger (H10 ECG, 130 Hz, µV): once "no numeric samples found"
    fs = 130.0
    uv = (wave(1300, fs) * 900).round()
    ns0 = 599618803766235184
    rows = [f"2023-05-01T10:00:{i / fs:06.3f};{ns0 + round(i * 1e9 / fs)};{i * 1000 / fs:.6f};{v:.0f}" for i, v in enumerate(uv)]
    p = tmp_path / "Polar_H10_ABCD1234_20230501_100000_ECG.txt"
    p.write_text("Phone timestamp;sensor timestamp [ns];timestamp [ms];ecg [uV]\n" + "\n".join(rows) + "\n")
    rec = read_recording(p)
    assert rec.fs == 130 and rec.leads == ["ecg [uV]"]
    np.testing.assert_allclose(rec.samples[0], uv * 1e-3, atol=1e-6)


def test_a_long_csv_is_read_without_a_blow_up(tmp_path: Path) -> None:
    # once about 16 bytes of memory per byte of file: a 24 h Holter CSV took more than 10 GB
    n = 200_000
    t = np.arange(n) / 500
    p = tmp_path / "holter.csv"
    np.savetxt(p, np.stack([t, np.sin(t), np.cos(t)], 1), fmt="%.4f", delimiter=",", header="time,I,II", comments="")
    size = p.stat().st_size
    tracemalloc.start()
    try:
        rec = read_recording(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rec.samples.shape == (2, n) and rec.fs == 500
    assert peak < 5 * size, f"peak {peak / size:.1f} x the file's size"


# -- WFDB and NumPy files that are not whole --------------------------------------------------


def test_a_broken_wfdb_header_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty.hea").write_text("")  # a download that failed: once an IndexError traceback
    with pytest.raises(ReplayError, match="empty.hea: cannot read"):
        read_recording(tmp_path / "empty.hea")
    x = np.round(wave(1000, 250.0) * 200).astype("<i2")
    x.tofile(tmp_path / "old.dat")
    (tmp_path / "old.hea").write_text("old 1 250 1000\nold.dat 16\n")  # no gain, units or name
    rec = read_recording(tmp_path / "old.hea")
    assert rec.leads == ["ch0"]  # once "None"


def test_a_truncated_npz_is_a_one_line_error(tmp_path: Path) -> None:
    whole = tmp_path / "whole.npz"
    np.savez(whole, ecg=wave(5000, 500.0), fs=500.0)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[:1000])  # once a zipfile.BadZipFile traceback
    with pytest.raises(ReplayError, match="cut.npz: cannot read"):
        read_recording(cut)
