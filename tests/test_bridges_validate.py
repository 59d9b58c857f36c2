"""ChunkChecker: one test per kind of bad input, plus clean streams staying clean."""
from __future__ import annotations

import numpy as np
import pytest

from echopulse.bridges import validate as v
from echopulse.bridges.chunk import EcgChunk
from echopulse.bridges.validate import ChunkChecker, Decision

FS = 250.0
N = 50  # 0.2 s chunks


def ecg_like(n: int, start: int = 0, leads: int = 1) -> np.ndarray:
    """Smooth, varying, non-repeating signal (no flat runs, no repeated extremes)."""
    t = (np.arange(start, start + n) / FS)[None, :] + np.arange(leads)[:, None]
    return (np.sin(2 * np.pi * 1.3 * t) + 0.3 * np.sin(2 * np.pi * 7.1 * t) + 0.01 * t).astype(np.float32)


def chunk(seq: int, samples: np.ndarray | None = None, t0: float | None = None, fs: float = FS) -> EcgChunk:
    if samples is None:
        samples = ecg_like(N, seq * N)
    return EcgChunk("d", samples, fs, seq * N / FS if t0 is None else t0, seq)


def feed(checker: ChunkChecker, count: int) -> None:
    for s in range(count):
        r = checker.check(chunk(s))
        assert r.decision is Decision.ACCEPT and r.issues == (), r.issues


def test_clean_stream_has_no_issues() -> None:
    c = ChunkChecker()
    feed(c, 40)  # 8 s: long enough for the flat and saturation checks to have run


def test_non_finite_repaired_with_last_value_raw_kept() -> None:
    c = ChunkChecker()
    feed(c, 2)
    x = ecg_like(N, 2 * N)
    x[0, 0] = np.nan
    x[0, 10:13] = [np.inf, -np.inf, np.nan]
    r = c.check(chunk(2, x))
    assert r.decision is Decision.REPAIRED and r.codes == [v.NON_FINITE]
    assert r.issues[0].count == 4
    out = r.chunk.samples
    assert np.isfinite(out).all()
    assert out[0, 0] == ecg_like(N, N)[0, -1]  # carried from the previous chunk
    assert (out[0, 10:13] == x[0, 9]).all()
    assert np.isnan(r.raw.samples[0, 0])  # the original is untouched


def test_non_finite_zero_fill() -> None:
    x = ecg_like(N)
    x[0, 5] = np.nan
    r = ChunkChecker(nan_fill="zero").check(chunk(0, x))
    assert r.chunk.samples[0, 5] == 0 and r.decision is Decision.REPAIRED


def test_gap_reported_and_accepted() -> None:
    c = ChunkChecker()
    feed(c, 3)
    r = c.check(chunk(3, t0=3 * N / FS + 0.5))
    assert r.decision is Decision.ACCEPT and r.codes == [v.GAP]
    assert r.issues[0].count == pytest.approx(0.5 * FS, abs=1)


def test_small_jitter_is_not_a_gap() -> None:
    c = ChunkChecker()
    feed(c, 3)
    assert c.check(chunk(3, t0=3 * N / FS + 0.01)).issues == ()


def test_duplicate_dropped() -> None:
    c = ChunkChecker()
    feed(c, 3)
    r = c.check(chunk(2))
    assert r.decision is Decision.DROP and r.codes == [v.DUPLICATE] and r.chunk is None
    assert c.check(chunk(3)).decision is Decision.ACCEPT  # state not disturbed by the drop


@pytest.mark.parametrize("again", [4, 2])  # the last chunk, an earlier one
def test_duplicate_of_a_chunk_shorter_than_the_tolerance_is_dropped(again: int) -> None:
    fs, n = 500.0, 10  # 20 ms chunks: no longer than the 20 ms gap tolerance
    short = [EcgChunk("d", ecg_like(n, s * n), fs, s * n / fs, s) for s in range(6)]
    c = ChunkChecker()
    for x in short[:5]:
        assert c.check(x).decision is Decision.ACCEPT
    r = c.check(short[again])  # redelivered (MQTT QoS 1): once taken as new data, after a seq_reset
    assert r.decision is Decision.DROP and r.codes == [v.DUPLICATE]
    assert c.check(short[5]).issues == ()  # and the stream goes on as before


def test_out_of_order_dropped() -> None:
    c = ChunkChecker()
    c.check(chunk(0))
    c.check(chunk(2))  # seq 1 late
    r = c.check(chunk(1))
    assert r.decision is Decision.DROP and r.codes == [v.OUT_OF_ORDER]


def test_repeated_duplicates_never_resync() -> None:
    c = ChunkChecker(resync_s=0.5)
    feed(c, 3)
    for _ in range(10):  # a broker re-delivering the same message again and again
        assert c.check(chunk(2)).codes == [v.DUPLICATE]
    assert c.check(chunk(3)).issues == ()


def test_device_restart_resynchronises() -> None:
    """Seq and clock both start again from 0: dropped as stale at first, then taken up
    once that has gone on for resync_s of ECG, instead of being dropped for ever."""
    c = ChunkChecker(resync_s=0.5)
    feed(c, 20)
    results = [c.check(chunk(s, ecg_like(N, (20 + s) * N))) for s in range(5)]
    assert [r.decision for r in results] == [Decision.DROP, Decision.DROP, Decision.ACCEPT, Decision.ACCEPT, Decision.ACCEPT]
    assert results[0].codes == [v.OUT_OF_ORDER] and results[2].codes == [v.TIME_RESET]
    assert results[3].issues == () and results[4].issues == ()


def test_single_late_chunk_dropped_not_resynced() -> None:
    c = ChunkChecker(resync_s=0.5)
    for s in [0, 1, 2, 3, 4, 6, 7, 8, 9]:
        c.check(chunk(s))
    assert c.check(chunk(5)).codes == [v.OUT_OF_ORDER]
    assert c.check(chunk(10)).issues == ()


def test_seq_gap_reported() -> None:
    c = ChunkChecker()
    c.check(chunk(0))
    r = c.check(chunk(4, t0=N / FS))  # time contiguous, three seqs lost
    assert r.codes == [v.SEQ_GAP] and r.issues[0].count == 3 and r.decision is Decision.ACCEPT


def test_seq_reset_when_time_moves_on() -> None:
    c = ChunkChecker()
    feed(c, 5)
    r = c.check(chunk(0, ecg_like(N, 5 * N), t0=5 * N / FS))
    assert r.codes == [v.SEQ_RESET] and r.decision is Decision.ACCEPT
    assert c.check(chunk(1, ecg_like(N, 6 * N), t0=6 * N / FS)).issues == ()


def test_partial_overlap_trimmed() -> None:
    c = ChunkChecker()
    c.check(chunk(0))
    x = ecg_like(N, N - 10)
    r = c.check(chunk(1, x, t0=(N - 10) / FS))
    assert r.decision is Decision.REPAIRED and r.codes == [v.OVERLAP]
    assert r.chunk.n_samples == N - 10 and r.chunk.t0 == pytest.approx(N / FS)
    np.testing.assert_array_equal(r.chunk.samples, x[:, 10:])


def test_full_overlap_dropped() -> None:
    c = ChunkChecker()
    feed(c, 2)
    r = c.check(chunk(2, t0=N / FS))
    assert r.decision is Decision.DROP and r.codes == [v.OVERLAP]


def test_fs_change_reported() -> None:
    c = ChunkChecker()
    feed(c, 2)
    r = c.check(chunk(2, ecg_like(100, 0), t0=2 * N / FS, fs=500.0))
    assert r.codes == [v.FS_CHANGE] and r.decision is Decision.ACCEPT
    nxt = chunk(3, ecg_like(100, 100), t0=2 * N / FS + 0.2, fs=500.0)
    assert c.check(nxt).issues == ()


def test_leads_change_reported() -> None:
    c = ChunkChecker()
    feed(c, 2)
    r = c.check(chunk(2, ecg_like(N, 2 * N, leads=3)))
    assert r.codes == [v.LEADS_CHANGE] and r.decision is Decision.ACCEPT


@pytest.mark.parametrize(
    "samples",
    [np.zeros((13, 10), np.float32), np.zeros((1, 0), np.float32), np.zeros(10, np.float32), np.zeros((1, 2, 3), np.float32)],
)
def test_bad_shape_dropped(samples: np.ndarray) -> None:
    r = ChunkChecker().check(chunk(0, samples))
    assert r.decision is Decision.DROP and r.codes == [v.BAD_SHAPE]


def test_bad_fs_dropped() -> None:
    r = ChunkChecker().check(chunk(0, fs=0.0))
    assert r.decision is Decision.DROP and r.codes == [v.BAD_SHAPE]


def test_saturation_inferred_rail() -> None:
    c = ChunkChecker()
    feed(c, 10)
    x = ecg_like(N, 4 * N) * 3  # bigger than anything before...
    rail = np.float32(1.5)
    x = np.minimum(x, rail)  # ...and clipped by the amplifier
    assert (x == rail).sum() > 20
    r = c.check(chunk(10, x))
    assert r.codes == [v.SATURATION] and r.decision is Decision.ACCEPT
    assert r.issues[0].count == int((x == rail).sum()) > 10


def test_saturation_counted_per_lead() -> None:
    c = ChunkChecker()
    for s in range(10):
        c.check(chunk(s, ecg_like(N, s * N, leads=3)))
    x = ecg_like(N, 4 * N, leads=3) * 3
    x[1] = np.minimum(x[1], 1.5)    # lead 1 clipped high
    x[2] = np.maximum(x[2], -0.5)   # floored inside its running range: not taken for a rail
    r = c.check(chunk(10, x))
    assert r.codes == [v.SATURATION]
    assert r.issues[0].count == int((x[1] == np.float32(1.5)).sum())


def test_saturation_explicit_rails() -> None:
    x = ecg_like(N)
    x[0, 3] = 5.0
    r = ChunkChecker(rails_mv=(-5.0, 5.0)).check(chunk(0, x))
    assert r.codes == [v.SATURATION] and r.issues[0].count == 1


def test_flat_line_after_flat_s_only() -> None:
    c = ChunkChecker(flat_s=1.0)
    feed(c, 5)
    rng = np.random.default_rng(0)
    flagged = []
    for s in range(5, 15):  # 2 s of lead-off: tiny noise around a constant
        x = (0.2 + 1e-4 * rng.standard_normal((1, N))).astype(np.float32)
        flagged.append(v.FLAT_LINE in c.check(chunk(s, x)).codes)
    # 1 s = 5 chunks of flat signal needed before it is called flat
    assert flagged == [False] * 4 + [True] * 6


def test_flat_line_per_lead() -> None:
    c = ChunkChecker(flat_s=0.4)
    for s in range(4):
        x = ecg_like(N, s * N, leads=2)
        x[1] = 0.0
        r = c.check(chunk(s, x))
    assert r.codes == [v.FLAT_LINE] and "[1]" in r.issues[0].message


@pytest.mark.parametrize(("fs", "lsb_uv"), [(130.0, 1.0), (1000.0, 3.3 / 1024 / 1100 * 1e6)])
def test_realistic_quantised_ecg_raises_nothing(fs: float, lsb_uv: float) -> None:
    """Simulated ECG quantised like a Polar H10 (1 µV) and a 10-bit BITalino (2.9 µV):
    no false saturation or flat line on a healthy signal."""
    from echopulse.core.simulate.ecg import simulate_ecg

    x = simulate_ecg(20.0, fs=fs, hr=70, seed=4).signal
    x = (np.round(x * 1000 / lsb_uv) * lsb_uv / 1000).astype(np.float32)
    c = ChunkChecker()
    step = int(fs * 0.25)
    for k in range(x.shape[1] // step):
        r = c.check(EcgChunk("d", x[:, k * step : (k + 1) * step], fs, k * step / fs, k))
        assert r.issues == (), (k, r.issues)
