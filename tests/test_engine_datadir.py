"""Raw ECG persistence: exact round trip, appends across restarts, crash-truncated index."""
from __future__ import annotations

import numpy as np
import pytest

try:
    import resource
except ImportError:  # Windows
    resource = None

from echopulse.bridges.chunk import EcgChunk
from echopulse.stream import datadir


def chunk(device: str, seq: int, n: int = 7, leads: int = 2, fs: float = 130.0) -> EcgChunk:
    rng = np.random.default_rng(seq)
    return EcgChunk(device, rng.normal(size=(leads, n)).astype(np.float32), fs, seq * n / fs, seq, "uV")


def test_round_trip_is_exact_and_keeps_the_index(tmp_path):
    sent = [chunk("polar/H10 a", i) for i in range(5)]
    sent[2].samples[1, 3] = np.nan  # stored as received
    d = datadir.DataDir(tmp_path)
    for c in sent:
        d.append(c)
    d.close()
    assert datadir.list_devices(tmp_path) == ["polar/H10 a"]
    samples, entries = datadir.read_device(tmp_path, "polar/H10 a")
    np.testing.assert_array_equal(samples, np.concatenate([c.samples for c in sent], axis=1))
    assert [(e["seq"], e["t0"], e["fs"], e["n"], e["leads"], e["unit"]) for e in entries] == [
        (c.seq, c.t0, c.fs, 7, 2, "uV") for c in sent]


def test_files_are_readable_before_close(tmp_path):
    writer = datadir.RawEcgWriter(tmp_path, "dev")
    writer.append(chunk("dev", 0))
    samples, entries = datadir.read_device(tmp_path, "dev")  # flushed per chunk: a crash loses nothing
    assert samples.shape == (2, 7) and len(entries) == 1
    writer.close()


def test_restart_appends(tmp_path):
    for i in range(3):
        d = datadir.DataDir(tmp_path)
        d.append(chunk("dev", i))
        d.close()
    _, entries = datadir.read_device(tmp_path, "dev")
    assert [e["seq"] for e in entries] == [0, 1, 2] and [e["offset"] for e in entries] == [0, 14, 28]


def test_half_written_last_line_is_ignored(tmp_path):
    d = datadir.DataDir(tmp_path)
    for i in range(3):
        d.append(chunk("dev", i))
    d.close()
    index = tmp_path / "dev" / datadir.INDEX_FILE
    index.write_text(index.read_text() + '{"seq": 3, "t0"')
    samples, entries = datadir.read_device(tmp_path, "dev")
    assert len(entries) == 3 and samples.shape == (2, 21)


@pytest.mark.parametrize("torn", ["samples", "index", "both"])
def test_restart_after_a_torn_write_cuts_back_to_the_last_whole_chunk(tmp_path, torn):
    d = datadir.DataDir(tmp_path)
    for i in range(3):
        d.append(chunk("dev", i))
    d.close()
    folder = tmp_path / "dev"
    if torn in ("samples", "both"):  # the crash came mid-way through a chunk's samples: 5 bytes, not whole floats
        with open(folder / datadir.SAMPLES_FILE, "ab") as f:
            f.write(b"\x01\x02\x03\x04\x05")
    if torn in ("index", "both"):  # or mid-way through its index line
        with open(folder / datadir.INDEX_FILE, "a") as f:
            f.write('{"seq": 3, "t0"')
    d = datadir.DataDir(tmp_path)  # the restart
    later = [chunk("dev", i) for i in (3, 4)]
    for c in later:
        d.append(c)
    d.close()
    samples, entries = datadir.read_device(tmp_path, "dev")
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]  # once: chunks 3 and 4 lost behind the torn line
    np.testing.assert_array_equal(samples[:, 21:], np.concatenate([c.samples for c in later], axis=1))  # once garbage


def test_a_long_index_is_repaired_from_its_end(tmp_path):
    d = datadir.DataDir(tmp_path)
    for i in range(700):  # an index of ~100 kB: more than one block read from the end
        d.append(chunk("dev", i))
    d.close()
    folder = tmp_path / "dev"
    samples = folder / datadir.SAMPLES_FILE
    samples.write_bytes(samples.read_bytes()[: -(2 * 14 * 4 + 3)])  # two chunks' samples lost, the third's torn
    d = datadir.DataDir(tmp_path)
    d.append(chunk("dev", 700))
    d.close()
    _, entries = datadir.read_device(tmp_path, "dev")
    assert [e["seq"] for e in entries] == [*range(697), 700]  # index lines without all their samples are cut too
    assert entries[-1]["offset"] == 697 * 14


@pytest.mark.parametrize("device", ["Patient-Müller-" + "é" * 60, "x" * 128, "%" * 100])
def test_long_device_ids_get_a_short_folder_and_keep_their_name(tmp_path, device):
    folder = datadir.device_dirname(device)
    assert len(folder.encode()) <= datadir.MAX_DIRNAME
    d = datadir.DataDir(tmp_path)  # "Müller-ééé…" is 375 bytes percent-encoded: once ENAMETOOLONG
    d.append(chunk(device, 0))
    d.append(chunk("short", 0))
    d.close()
    assert datadir.list_devices(tmp_path) == sorted([device, "short"])
    samples, _ = datadir.read_device(tmp_path, device)
    assert samples.shape == (2, 7)
    assert datadir.device_dirname(device + "!") != folder  # the hash keeps ids with a common head apart


def test_lead_change_needs_read_chunks(tmp_path):
    d = datadir.DataDir(tmp_path)
    d.append(chunk("dev", 0, leads=1))
    d.append(chunk("dev", 1, leads=3))
    d.close()
    with pytest.raises(ValueError, match="read_chunks"):
        datadir.read_device(tmp_path, "dev")
    assert [c.samples.shape for c in datadir.read_chunks(tmp_path, "dev")] == [(1, 7), (3, 7)]


@pytest.mark.parametrize("device", ["..", ".hidden", "a/../../b", "ünï"])
def test_device_ids_stay_inside_the_data_dir(tmp_path, device):
    d = datadir.DataDir(tmp_path / "root")
    d.append(chunk(device, 0))
    d.close()
    assert datadir.list_devices(tmp_path / "root") == [device]
    assert [p.parent.parent for p in (tmp_path / "root").glob("*/*")] == [tmp_path / "root"] * 2


def test_a_chunk_of_bad_shape_leaves_the_next_chunks_at_their_samples(tmp_path):
    d = datadir.DataDir(tmp_path)
    d.append(chunk("dev", 0))
    bad = EcgChunk("dev", np.ones(5, np.float32), 130.0, 1.0, 1)  # 1-D: no leads axis
    with pytest.raises(IndexError):
        d.append(bad)
    d.append(chunk("dev", 2))
    d.close()
    chunks = list(datadir.read_chunks(tmp_path, "dev"))  # once: chunk 2 read as chunk 1's samples
    assert [c.entry["seq"] for c in chunks] == [0, 2]
    np.testing.assert_array_equal(chunks[1].samples, chunk("dev", 2).samples)


@pytest.mark.skipif(resource is None, reason="needs RLIMIT_FSIZE")
def test_a_full_disk_loses_only_the_chunks_it_refused(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail (EFBIG) after a short write."""
    d = datadir.DataDir(tmp_path)
    big = [chunk("dev", i, n=4096) for i in range(4)]  # 32 kB of samples each
    later = [chunk("dev", i, n=4096) for i in (4, 5)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    d.append(big[0])
    d.append(big[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 32768 + 10_000, hard))  # part of the next chunk fits
    try:
        for c in big[2:]:
            with pytest.raises(OSError):
                d.append(c)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    for c in later:  # space again
        d.append(c)
    d.close()  # once: raised the refused write again from its buffer
    samples, entries = datadir.read_device(tmp_path, "dev")
    assert [e["seq"] for e in entries] == [0, 1, 4, 5]
    # once: chunks 4 and 5 were indexed at the refused chunks' samples
    np.testing.assert_array_equal(samples, np.concatenate([c.samples for c in [*big[:2], *later]], axis=1))
