"""The serve / replay / subscribe commands, run as a user would."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from echopulse.core.simulate.ecg import simulate_ecg
from echopulse.stream import datadir, protocol
from echopulse.stream.cli import main
from echopulse.stream.protocol import FrameMessage, StatusMessage
from echopulse.stream.publish import Publisher
from echopulse.stream.subscribe import Subscriber

FS = 250.0


@pytest.fixture(scope="module")
def recording():
    return simulate_ecg(12.0, fs=FS, hr=75.0, seed=7, pvc_rate=0.0)


@pytest.fixture
def csv_file(tmp_path, recording):
    path = tmp_path / "rec.csv"
    np.savetxt(path, recording.signal[0], fmt="%.6f")
    return path


def test_replay_npz_has_frames_per_beat(tmp_path, csv_file, recording):
    out = tmp_path / "out.npz"
    assert main(["replay", str(csv_file), "--fs", "250", "--out", str(out), "--backend", "sim"]) == 0
    with np.load(out) as z:
        data = {k: z[k] for k in z.files}
    assert {"frames", "t", "beat", "r_peaks", "hr"} <= set(data)
    frames, t, beat, r_peaks, hr = (data[k] for k in ("frames", "t", "beat", "r_peaks", "hr"))
    assert frames.dtype == np.uint8 and frames.ndim == 3 and len(frames) == len(t) == len(beat)
    assert len(r_peaks) == len(hr) == len(recording.r_peaks) - 1
    np.testing.assert_allclose(r_peaks, recording.r_peaks[:-1], atol=0.02)
    np.testing.assert_allclose(hr, 75.0, rtol=0.2)
    assert np.all(np.diff(beat) >= 0) and set(beat.tolist()) == set(range(len(r_peaks)))
    assert np.all(np.diff(t) > 0)  # ECG time runs forward across beats
    for b in range(len(r_peaks)):  # every beat's frames start at its R
        assert t[beat == b][0] == pytest.approx(r_peaks[b], abs=1e-6)


def test_replay_mp4(tmp_path, recording):
    import imageio_ffmpeg

    rec = tmp_path / "rec.npy"
    np.save(rec, recording.signal)
    out = tmp_path / "out.mp4"
    assert main(["replay", str(rec), "--fs", "250", "--out", str(out), "--backend", "sim"]) == 0
    n_frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert n_frames >= 10 * (len(recording.r_peaks) - 2)
    assert seconds == pytest.approx(recording.r_peaks[-2] - recording.r_peaks[0], rel=0.15)  # plays at ECG pace


@pytest.mark.parametrize(
    "argv, words",
    [
        (["replay", "missing.csv", "--out", "{tmp}/o.npz"], "no such file"),
        (["replay", "{csv}", "--out", "{tmp}/o.avi"], ".npz or .mp4"),
        (["replay", "{csv}", "--out", "{tmp}/nofolder/o.npz"], "does not exist"),
        (["replay", "{csv}", "--out", "{tmp}/o.npz", "--device", "a b"], "device"),
        (["serve", "--source", "gopher://x", "--data-dir", "{tmp}/d"], "expected one of"),
        (["serve", "--source", "file://{tmp}/none.csv", "--data-dir", "{tmp}/d"], "no such file"),
        (["serve", "--source", "mqtt://:1883/ecg/+", "--data-dir", "{tmp}/d"], "no broker host"),
        (["serve", "--source", "synthetic://?devices=x", "--data-dir", "{tmp}/d"], "devices"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--metrics", "9108"], "HOST:PORT"),
        (["serve", "--data-dir", "{tmp}/d"], "--source"),
        (["serve", "--source", "ble://AA:BB?mode=ppg", "--data-dir", "{tmp}/d"], "mode must be"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "sim", "--precision", "bf16"],
         "for the model backend"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "model", "--no-batching",
          "--precision", "bf16"], "only apply with batching"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "model", "--reference", "x.mp4"],
         "expected DEVICE=FILE"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "model", "--reference",
          "sim-0={tmp}/none.mp4"], "reference for sim-0"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "model", "--reference",
          "a={csv}", "--reference", "a={csv}"], "a given twice"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "model", "--allow-device",
          "polar-1", "--reference", "polar_1={csv}"], "reference loops for polar_1, which --allow-device does not serve"),
        (["serve", "--source", "synthetic://", "--data-dir", "{tmp}/d", "--backend", "sim", "--reference", "a={csv}"],
         "references is for the model backend"),
        (["replay", "{csv}", "--fs", "250", "--out", "{tmp}/o.npz", "--reference", "{csv}"],
         "unknown reference loop format '.csv'"),
        (["replay", "{csv}", "--fs", "250", "--out", "{tmp}/o.npz", "--reference", "{tmp}/none.dcm"], "no such file"),
        (["subscribe", "tcp://127.0.0.1:1", "--out", "{tmp}/o.txt"], ".npz"),
        (["subscribe", "nonsense", "--count", "1"], "cannot connect"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(argv, words, tmp_path, csv_file, capsys):
    argv = [a.format(tmp=tmp_path, csv=csv_file) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "error" in err


def test_replay_output_is_checked_before_rendering_and_keeps_its_name(tmp_path, csv_file, capsys):
    (tmp_path / "dir.npz").mkdir()
    assert main(["replay", str(csv_file), "--fs", "250", "--out", str(tmp_path / "dir.npz"), "--backend", "sim"]) == 2
    assert "is a folder" in capsys.readouterr().err
    # np.savez given a name adds ".npz" to an upper-case suffix: OUT.NPZ became OUT.NPZ.npz
    assert main(["replay", str(csv_file), "--fs", "250", "--out", str(tmp_path / "OUT.NPZ"), "--backend", "sim"]) == 0
    assert sorted(p.name for p in tmp_path.glob("OUT*")) == ["OUT.NPZ"]
    assert len(np.load(tmp_path / "OUT.NPZ")["frames"]) > 0


def test_a_cuda_device_this_machine_lacks_is_a_clear_error():
    """A config's torch_device = "cuda" on the CPU build of torch was an AssertionError traceback."""
    from echopulse.stream import backends

    with pytest.raises(RuntimeError, match="cuda:99: .*CUDA"):
        backends.make_backend("model", device="cuda:99")


@pytest.mark.slow
def test_replay_with_a_patients_loop_follows_that_patients_ef(tmp_path, recording):
    """--reference: the generated heart contracts like the patient's echo, not like a default heart."""
    from echopulse.core.generator import DEFAULT_WEIGHTS
    from echopulse.core.lv_segmenter import load_segmenter
    from echopulse.core.simulate.measure import disc_volumes
    from echopulse.core.simulate.paired import simulate_pair

    rec = tmp_path / "rec.npy"
    np.save(rec, recording.signal)
    segmenter = load_segmenter(DEFAULT_WEIGHTS)
    measured = {}
    for name, seed, ef in (("weak", 5, 30.0), ("strong", 9, 65.0), ("none", None, None)):
        argv = ["replay", str(rec), "--fs", "250", "--out", str(tmp_path / f"{name}.npz"), "--backend", "model"]
        if seed is not None:
            sample = simulate_pair(seed=seed, size=64, frames=60, fps=30.0, ef=ef)
            np.savez(tmp_path / f"{name}-echo.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
            argv += ["--reference", str(tmp_path / f"{name}-echo.npz")]
        assert main(argv) == 0
        with np.load(tmp_path / f"{name}.npz") as z:
            frames, beat, prime = z["frames"], z["beat"], str(z["prime"])
        assert prime == ("simulated" if seed is None else "reference")
        efs = []
        for b in np.unique(beat):
            volumes = disc_volumes(segmenter.masks(frames[beat == b]), 1.0)
            efs.append(100.0 * (volumes.max() - volumes.min()) / volumes.max())
        measured[name] = float(np.median(efs))
    assert measured["weak"] + 20 < measured["strong"], measured  # measured here: about 21 and 59


@pytest.mark.slow
def test_replay_with_a_dicom_whose_r_marks_sit_on_adjacent_frames(tmp_path, recording):
    """R Wave Pointer marks on frames 3 and 4 once made a 1-frame loop that the loader
    accepted and the generator refused at the first beat: replay ended in a traceback."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from echopulse.core.simulate.paired import simulate_pair

    video = simulate_pair(seed=5, size=64, frames=12, fps=30.0)["video"]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.3.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.Modality = meta, "US"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 64, 64, len(video), 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RWavePointer, ds.PixelData = [3, 4, 10], video.tobytes()
    ds.save_as(tmp_path / "adjacent.dcm", enforce_file_format=True)
    rec = tmp_path / "rec.npy"
    np.save(rec, recording.signal)
    out = tmp_path / "out.npz"
    assert main(["replay", str(rec), "--fs", "250", "--out", str(out), "--backend", "model",
                 "--reference", str(tmp_path / "adjacent.dcm")]) == 0
    with np.load(out) as z:
        assert len(z["frames"]) > 0 and str(z["prime"]) == "reference"


def test_replay_of_a_file_below_the_detectors_rate_is_a_cli_error(tmp_path, capsys):
    slow = tmp_path / "slow.npz"
    np.savez(slow, ecg=np.zeros((1, 400), np.float32), fs=40.0)  # once a traceback from the band-pass design
    assert main(["replay", str(slow), "--out", str(tmp_path / "o.npz"), "--backend", "sim"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "40 Hz outside 50..20000 Hz" in err
    with pytest.raises(SystemExit) as info:  # argparse's own refusal of --fs
        main(["replay", str(slow), "--out", str(tmp_path / "o.npz"), "--fs", "41.67"])
    assert info.value.code == 2 and "fs must be between 50 and 20,000" in capsys.readouterr().err


def test_replay_unreadable_file_is_a_cli_error(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not numpy at all")
    assert main(["replay", str(bad), "--out", str(tmp_path / "o.npz"), "--fs", "250"]) == 2
    assert "bad.npy" in capsys.readouterr().err


@pytest.mark.network
def test_subscribe_prints_lines_and_saves(tmp_path, capsys):
    out = tmp_path / "got.npz"
    frames = np.arange(3 * 16 * 16, dtype=np.uint8).reshape(3, 16, 16)
    ecg = protocol.beat_ecg_fields(np.ones((1, 400), np.float32), np.ones(400, bool), 250.0, 0.5, 0.8)
    with Publisher("tcp://127.0.0.1:0") as pub:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "rc", main(["subscribe", pub.endpoint, "--count", "6", "--timeout", "10", "--out", str(out)])))
        thread.start()
        deadline = time.monotonic() + 10
        beat = 0
        while thread.is_alive() and time.monotonic() < deadline:  # slow joiner: keep sending
            pub.publish_status("dev", "overload", f"round {beat}", {"beats_dropped": beat})
            pub.publish_frames("dev", frames, times=[1.0, 1.1, 1.2], beat=beat, r_time=1.0, rr=0.8, model="sim",
                               capture=time.time(), extra=ecg)  # binary, as the engine sends: once a TypeError at save
            beat += 1
            time.sleep(0.05)
        thread.join(timeout=5)
    assert result["rc"] == 0
    lines = capsys.readouterr().out.splitlines()
    frame_lines = [line for line in lines if line.startswith("frame")]
    assert len(frame_lines) == 6 and all("dev" in line and "hr=75.0" in line for line in frame_lines)
    assert any(line.startswith("status dev overload: round") for line in lines)
    with np.load(out) as z:
        assert z["frames"].shape == (6, 16, 16)
        headers = [json.loads(h) for h in z["headers"]]
        for h, f in zip(headers, z["frames"]):
            protocol.validate_header(h)
            np.testing.assert_array_equal(f, frames[h["frame"]])
        assert list(z["seq"]) == [h["seq"] for h in headers]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.network
def test_serve_sigterm_exits_0_with_files_flushed(tmp_path, recording):
    rec = tmp_path / "rec.npy"
    np.save(rec, recording.signal)
    data = tmp_path / "data"
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "echopulse.stream.cli", "serve", "--source", f"file://{rec}?fs=250&speed=2&device=holter",
           "--publish", endpoint, "--data-dir", str(data), "--backend", "sim"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
    got = []
    try:
        with Subscriber(endpoint) as sub:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len([m for m in got if isinstance(m, FrameMessage)]) < 20:
                msg = sub.recv(timeout=0.5)
                if msg is not None:
                    got.append(msg)
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
            while (msg := sub.recv(timeout=0.5)) is not None:
                got.append(msg)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    frames = [m for m in got if isinstance(m, FrameMessage)]
    assert len(frames) >= 20 and all(m.device == "holter" for m in frames)
    assert [m.code for m in got if isinstance(m, StatusMessage)][-1:] == ["stopped"]
    samples, entries = datadir.read_device(data, "holter")
    assert entries and len(entries) == len(set(e["seq"] for e in entries))
    np.testing.assert_array_equal(samples, recording.signal[:, :samples.shape[1]])  # every chunk received, whole


@pytest.mark.network
def test_subscribe_summary_and_timeout(capsys):
    with Publisher("tcp://127.0.0.1:0") as pub:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault(
            "rc", main(["subscribe", pub.endpoint, "--topic", "echo/", "--summary", "--timeout", "1.0"])))
        thread.start()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # then silence: --timeout ends the command
            pub.publish_frames("a", np.zeros((2, 4, 4), np.uint8), times=[0.0, 0.4], beat=0, r_time=0.0, rr=0.8,
                               model="sim", capture=time.time())
            pub.publish_status("a", "overload", "not subscribed to")
            time.sleep(0.05)
        thread.join(timeout=10)
    assert not thread.is_alive() and result["rc"] == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("frames=") and "statuses=0 devices=1 lost=0" in lines[0]


def test_ble_source_modes():
    from echopulse.bridges.ble import HeartRateSource, PolarH10Source
    from echopulse.stream.cli.serve import make_source

    assert isinstance(make_source("ble://AA:BB:CC:DD:EE:FF"), PolarH10Source)
    assert isinstance(make_source("ble://AA:BB:CC:DD:EE:FF?mode=hr"), HeartRateSource)


@pytest.mark.network
@pytest.mark.slow
def test_serve_batches_the_model_across_devices(tmp_path):
    """--batching: two devices' beats go through one resident generator; both get frames."""
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    from echopulse.core.simulate.paired import simulate_pair

    sample = simulate_pair(seed=5, size=64, frames=60, fps=30.0, ef=30.0)
    np.savez(tmp_path / "echo.npz", **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    cmd = [sys.executable, "-m", "echopulse.stream.cli", "-v", "serve", "--source", "synthetic://?devices=2&hr=90",
           "--publish", endpoint, "--data-dir", str(tmp_path / "data"), "--backend", "model", "--batching",
           "--batch-window-ms", "20", "--duration", "30", "--reference", f"sim-0={tmp_path / 'echo.npz'}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
    frames: list[FrameMessage] = []
    try:
        with Subscriber(endpoint) as sub:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and (len({m.device for m in frames}) < 2 or len(frames) < 40):
                msg = sub.recv(timeout=0.5)
                if isinstance(msg, FrameMessage):
                    frames.append(msg)
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert len(frames) >= 40 and len({m.device for m in frames}) == 2
    assert all(m.header["model"].startswith("model:") for m in frames)
    # sim-0 starts from its patient's echo, sim-1 from a simulated heart, and the frames say so
    assert {m.header["prime"] for m in frames if m.device == "sim-0"} == {"reference"}
    assert {m.header["prime"] for m in frames if m.device == "sim-1"} == {"simulated"}
    assert b"batching within 20.0 ms" in err and b"Traceback" not in err and b"reference loop for sim-0" in err
