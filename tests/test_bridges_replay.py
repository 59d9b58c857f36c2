"""File readers and FileSource, on real files of every format written into tmp_path."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest

from echopulse.bridges.replay import FileSource, ReplayError, read_recording
from echopulse.bridges.textfiles import BITALINO_ECG_GAIN, BITALINO_VCC


def wave(n: int, fs: float, leads: int = 1) -> np.ndarray:
    t = np.arange(n) / fs
    return np.stack([np.sin(2 * np.pi * (1.1 + i) * t) * (1 + i) for i in range(leads)]).astype(np.float32)


# -- plain tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("delim", [",", ";", "\t", " "])
def test_csv_with_time_column_gives_fs(tmp_path: Path, delim: str) -> None:
    fs = 360.0
    x = wave(720, fs, leads=2)
    t = np.arange(720) / fs
    lines = [delim.join(["time", "MLII", "V5"])]
    lines += [delim.join([f"{ti:.4f}", f"{a:.6f}", f"{b:.6f}"]) for ti, a, b in zip(t, x[0], x[1])]
    p = tmp_path / "rec.csv"
    p.write_text("\n".join(lines) + "\n")
    rec = read_recording(p)
    assert rec.fs == 360.0
    assert rec.leads == ["MLII", "V5"]
    np.testing.assert_allclose(rec.samples, x, atol=1e-6)
    assert rec.samples.dtype == np.float32


def test_decimal_comma_semicolon_and_time_in_ms(tmp_path: Path) -> None:
    lines = ["Zeit (ms);EKG (uV)"] + [f"{i * 2};{v:.1f}".replace(".", ",") for i, v in enumerate(range(-50, 50))]
    p = tmp_path / "de.csv"
    p.write_text("\n".join(lines))
    # "Zeit" is not a time word the reader knows: it stays a column, --fs gives the rate
    assert read_recording(p, fs=500).leads == ["Zeit (ms)", "EKG (uV)"]
    rec = read_recording(p, fs=500, lead="EKG (uV)")
    np.testing.assert_allclose(rec.samples[0], np.arange(-50, 50) * 1e-3, atol=1e-7)


@pytest.mark.parametrize(("label", "scale"), [("time_ms", 1000.0), ("Time [s]", 1.0), ("timestamp", 1.0), ("t (ms)", 1000.0)])
def test_time_label_units(tmp_path: Path, label: str, scale: float) -> None:
    p = tmp_path / "t.csv"
    p.write_text(f"{label},ecg\n" + "\n".join(f"{i / 500 * scale:g},{i % 7}" for i in range(100)))
    rec = read_recording(p)
    assert rec.fs == 500 and rec.leads == ["ecg"]


def test_headerless_single_column_needs_fs(tmp_path: Path) -> None:
    p = tmp_path / "one.txt"
    p.write_text("\n".join(str(v) for v in np.linspace(-1, 1, 100)))
    with pytest.raises(ReplayError, match="pass --fs"):
        read_recording(p)
    rec = read_recording(p, fs=250)
    assert rec.samples.shape == (1, 100) and rec.fs == 250 and rec.leads == ["ch0"]


def test_headerless_time_and_index_columns_detected(tmp_path: Path) -> None:
    x = wave(200, 100.0)
    p = tmp_path / "t.txt"
    p.write_text("\n".join(f"{i / 100:.2f} {v:.5f} {-v:.5f}" for i, v in enumerate(x[0])))
    rec = read_recording(p)
    assert rec.fs == 100 and rec.samples.shape == (2, 200)
    q = tmp_path / "i.txt"
    q.write_text("\n".join(f"{i}\t{v:.5f}" for i, v in enumerate(x[0])))
    rec = read_recording(q, fs=100)
    assert rec.samples.shape == (1, 200)  # the index column is dropped


def test_physiobank_csv_export_with_quoted_labels_and_sample_numbers(tmp_path: Path) -> None:
    x = (wave(720, 360.0, leads=2) * 200 + 1000).round()  # ADC units, as the export writes them
    p = tmp_path / "100.csv"
    p.write_text("'sample #','MLII','V5'\n" + "\n".join(f"{i},{a:.0f},{b:.0f}" for i, (a, b) in enumerate(x.T)))
    rec = read_recording(p, fs=360)
    assert rec.leads == ["MLII", "V5"]  # once "'sample #'" as lead 0, a ramp with no beats
    np.testing.assert_allclose(rec.samples, x)
    assert read_recording(p, fs=360, lead="MLII").leads == ["MLII"]  # once refused: the label kept its quotes


def test_lead_by_index_and_bad_lead(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("a,b,c\n" + "\n".join(f"{i},{2 * i},{3 * i}" for i in range(10)))
    assert read_recording(p, fs=10, lead=2).samples[0, 3] == 9
    assert read_recording(p, fs=10, lead="B").leads == ["b"]
    with pytest.raises(ReplayError, match="no lead 'z'"):
        read_recording(p, fs=10, lead="z")


def test_unreadable_files(tmp_path: Path) -> None:
    p = tmp_path / "words.csv"
    p.write_text("hello,world\nno,numbers\n")
    with pytest.raises(ReplayError, match="no numeric samples"):
        read_recording(p, fs=100)
    with pytest.raises(ReplayError, match="cannot read"):
        read_recording(tmp_path / "missing.csv", fs=100)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ReplayError, match="binary data"):
        read_recording(blob, fs=100)
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an npy file")
    with pytest.raises(ReplayError) as info:
        read_recording(bad, fs=100)
    assert "\n" not in str(info.value)


# -- Apple Health ---------------------------------------------------------------------------


def apple_csv(values: np.ndarray, rate_line: str = "Sample Rate,512 hertz", words: tuple[str, str] = ("Lead", "Unit")) -> str:
    head = [
        "Name,Jane Appleseed",
        'Date of Birth,"Jan 1, 1980"',
        "Recorded Date,2024-03-01 08:15:02 +0100",
        "Classification,Sinus Rhythm",
        "Symptoms,",
        "Software Version,2.0",
        'Device,"Watch6,1"',
        rate_line,
        "",
        f"{words[0]},Lead I",
        f"{words[1]},µV",
        "",
        "",
    ]
    return "\n".join(head + [f"{v:.3f}" for v in values]) + "\n"


def test_apple_health_export(tmp_path: Path) -> None:
    uv = wave(512 * 2, 512.0)[0] * 800
    p = tmp_path / "ecg_2024-03-01.csv"
    p.write_text(apple_csv(uv), encoding="utf-8")
    rec = read_recording(p)
    assert rec.fs == 512 and rec.leads == ["Lead I"]
    np.testing.assert_allclose(rec.samples[0], uv * 1e-3, atol=1e-6)


def test_apple_health_other_locale(tmp_path: Path) -> None:
    uv = wave(600, 512.0)[0] * 500
    p = tmp_path / "ekg.csv"
    p.write_text(apple_csv(uv, "Abtastrate,512 Hertz", ("Ableitung", "Einheit")), encoding="utf-8")
    rec = read_recording(p)
    assert rec.fs == 512
    np.testing.assert_allclose(rec.samples[0], uv * 1e-3, atol=1e-6)
    # decimal commas, quoted as a comma-separated file must quote them
    text = apple_csv(uv, "Fréquence d'échantillonnage,512 Hz", ("Dérivation", "Unité"))
    head, _, body = text.partition("\n\n\n")
    q = tmp_path / "ecg_fr.csv"
    q.write_text(head + "\n\n\n" + "\n".join(f'"{line.replace(".", ",")}"' for line in body.split()), encoding="utf-8")
    rec = read_recording(q)
    assert rec.fs == 512 and rec.leads == ["Lead I"]
    np.testing.assert_allclose(rec.samples[0], uv * 1e-3, atol=1e-6)


# -- OpenSignals ---------------------------------------------------------------------------


def opensignals(adc: np.ndarray, fs: int = 1000, resolution: list[int] | None = None) -> str:
    header = {
        "00:07:80:0F:2F:EB": {
            "sensor": ["RAW", "ECG"],
            "device name": "00:07:80:0F:2F:EB",
            "column": ["nSeq", "I1", "I2", "O1", "O2", "A1", "A2"],
            "sampling rate": fs,
            "label": ["A1", "A2"],
            "resolution": resolution or [4, 1, 1, 1, 1, 10, 10],  # one per column, as OpenSignals writes it
            "device": "bitalino_rev",
        }
    }
    lines = ["# OpenSignals Text File Format", "# " + json.dumps(header), "# EndOfHeader"]
    for i, a in enumerate(adc):
        lines.append("\t".join(str(v) for v in (i % 16, 0, 0, 0, 0, 512, int(a))))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("resolution", [None, [10, 10]])  # per column (OpenSignals), per label
def test_opensignals_bitalino_transfer_function(tmp_path: Path, resolution: list[int] | None) -> None:
    adc = np.array([0, 256, 512, 768, 1023] * 40)
    p = tmp_path / "opensignals_000780.txt"
    p.write_text(opensignals(adc, resolution=resolution))
    rec = read_recording(p)
    assert rec.fs == 1000 and rec.leads == ["A2"]
    # (ADC/2^10 - 0.5) * 3.3 V / 1100, in mV: 512 -> 0, full scale -> about ±1.5 mV
    expect_mv = (adc / 1024 - 0.5) * BITALINO_VCC / BITALINO_ECG_GAIN * 1000
    np.testing.assert_allclose(rec.samples[0], expect_mv, rtol=1e-6)
    assert rec.samples[0, 2] == 0 and -1.51 < rec.samples.min() < -1.49
    other = read_recording(p, lead="A1")  # the user says which channel
    assert other.leads == ["A1"] and np.allclose(other.samples, 0)


# -- NumPy ---------------------------------------------------------------------------------


def test_npy_needs_fs_and_is_oriented(tmp_path: Path) -> None:
    x = wave(1000, 250.0, leads=3)
    p = tmp_path / "x.npy"
    np.save(p, x.T)  # n × leads
    with pytest.raises(ReplayError, match="pass --fs"):
        read_recording(p)
    rec = read_recording(p, fs=250)
    np.testing.assert_array_equal(rec.samples, x)


def test_npz_keys(tmp_path: Path) -> None:
    x = wave(1000, 500.0, leads=2) * 1000
    p = tmp_path / "x.npz"
    np.savez(p, ecg=x, fs=np.float64(500), leads=np.array(["I", "II"]), unit=np.array("uV"))
    rec = read_recording(p)
    assert rec.fs == 500 and rec.leads == ["I", "II"]
    np.testing.assert_allclose(rec.samples, x / 1000, rtol=1e-6)
    q = tmp_path / "two.npz"
    np.savez(q, a=x, b=x)
    with pytest.raises(ReplayError, match="which array"):
        read_recording(q, fs=500)


# -- WFDB ---------------------------------------------------------------------------------


def test_wfdb_record_written_by_wfdb(tmp_path: Path) -> None:
    import wfdb

    fs = 360
    x = wave(fs * 3, fs, leads=2).T.astype(np.float64)  # (n, leads), mV
    wfdb.wrsamp("rec100", fs=fs, units=["mV", "uV"], sig_name=["MLII", "V5"], p_signal=x * [1, 1000], fmt=["16", "16"], adc_gain=[200, 0.2], baseline=[0, 0], write_dir=str(tmp_path))
    for path in (tmp_path / "rec100", tmp_path / "rec100.hea", tmp_path / "rec100.dat"):
        rec = read_recording(path)
        assert rec.fs == fs and rec.leads == ["MLII", "V5"]
        np.testing.assert_allclose(rec.samples, x.T, atol=0.01)  # 16-bit quantisation
    assert read_recording(tmp_path / "rec100", lead="V5").samples.shape == (1, fs * 3)


def test_wfdb_clinical_record_with_pressure_and_plethysmogram(tmp_path: Path, caplog) -> None:
    import wfdb

    fs = 125
    ecg = wave(fs * 4, fs, leads=1)[0].astype(np.float64)
    abp, pleth = 80 + 40 * np.abs(np.sin(np.arange(fs * 4) / 40)), np.linspace(0, 1, fs * 4)
    wfdb.wrsamp("icu", fs=fs, units=["mmHg", "mV", "NU"], sig_name=["ABP", "II", "PLETH"], p_signal=np.stack([abp, ecg, pleth], 1),
                fmt=["16"] * 3, adc_gain=[100, 200, 1000], baseline=[0, 0, 0], write_dir=str(tmp_path))
    path = tmp_path / "icu.hea"
    for lead in ("II", "ii", 1, "1"):  # the chosen lead alone is converted: ABP's mmHg no longer fails the file
        rec = read_recording(path, lead=lead)
        assert rec.leads == ["II"] and np.allclose(rec.samples[0], ecg, atol=0.01)
    with caplog.at_level("WARNING"):
        rec = read_recording(path)  # no lead: the channels in volts, the others named
    assert rec.leads == ["II"] and "ABP (mmHg)" in caplog.text and "PLETH (NU)" in caplog.text
    with pytest.raises(ReplayError, match="channel ABP.*unknown unit 'mmHg'"):
        read_recording(path, lead="ABP")
    with pytest.raises(ReplayError, match="no lead 'V5'"):
        read_recording(path, lead="V5")
    wfdb.wrsamp("bp", fs=fs, units=["mmHg"], sig_name=["ABP"], p_signal=abp[:, None], fmt=["16"], adc_gain=[100], baseline=[0],
                write_dir=str(tmp_path))
    with pytest.raises(ReplayError, match="no channel in volts"):
        read_recording(tmp_path / "bp.hea")


# -- FileSource -----------------------------------------------------------------------------


async def test_file_source_as_fast_as_possible(tmp_path: Path) -> None:
    x = wave(1000, 250.0, leads=2)
    p = tmp_path / "x.npy"
    np.save(p, x)
    src = FileSource(p, fs=250, chunk_s=0.3, device="bed-4")
    async with asyncio.timeout(5):
        chunks = [c async for c in src]
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) == 14  # 75 samples each
    assert all(c.device == "bed-4" and c.fs == 250 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in chunks], axis=1), x)
    for a, b in zip(chunks, chunks[1:]):
        assert b.t0 == pytest.approx(a.t_end)  # contiguous in time
    assert src.counters["samples"] == 1000


async def test_file_source_real_time_pacing(tmp_path: Path) -> None:
    p = tmp_path / "x.npy"
    np.save(p, wave(100, 100.0))  # 1 s of ECG
    start = time.monotonic()
    async with asyncio.timeout(5):
        chunks = [c async for c in FileSource(p, fs=100, chunk_s=0.1, realtime=4.0)]
    elapsed = time.monotonic() - start
    assert len(chunks) == 10
    assert 0.23 <= elapsed < 0.6  # 1 s at 4× real time


async def test_file_source_reports_bad_file_on_first_next(tmp_path: Path) -> None:
    p = tmp_path / "x.npy"
    np.save(p, wave(100, 100.0))
    src = FileSource(p)  # no fs
    with pytest.raises(ReplayError, match="pass --fs"):
        async with asyncio.timeout(5):
            await anext(src)
