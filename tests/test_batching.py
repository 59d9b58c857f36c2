"""Multi-stream batching: the policy, the dispatcher, and batched == per-device generation on a real tiny model."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from echopulse.core.generator import Generator
from echopulse.core.resident import BeatRequest, ResidentGenerator, clone_states, padded_size
from echopulse.stream.backends import beat_seed
from echopulse.stream.batching import BatchingBackend, BatchPolicy, BeatBatcher, Pending, due, take_batch


def test_padded_size_picks_the_next_fixed_size() -> None:
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    with pytest.raises(ValueError):
        padded_size(65)


def _p(device: str, arrival: float, leads: int = 1) -> Pending:
    return Pending(device=device, leads=leads, arrival=arrival)


def test_a_beat_waits_for_company_at_most_the_window() -> None:
    policy = BatchPolicy(window_s=0.01)
    pending = [_p("a", 1.0), _p("b", 1.004)]
    assert due(pending, 1.005, policy) == pytest.approx(0.005)
    assert take_batch(pending, 1.005, policy) == [] and len(pending) == 2
    batch = take_batch(pending, 1.0101, policy)
    assert [p.device for p in batch] == ["a", "b"] and pending == []
    assert due(pending, 2.0, policy) is None


def test_a_full_batch_runs_at_once_oldest_first() -> None:
    policy = BatchPolicy(window_s=10.0, sizes=(1, 2, 4))
    pending = [_p(f"d{i}", 1.0 + 0.001 * (5 - i)) for i in range(5)]
    batch = take_batch(pending, 1.0, policy)
    assert [p.device for p in batch] == ["d4", "d3", "d2", "d1"]
    assert [p.device for p in pending] == ["d0"]


def test_one_beat_per_device_and_one_lead_count_per_batch() -> None:
    policy = BatchPolicy(window_s=0.0)
    pending = [_p("a", 1.0), _p("a", 1.1), _p("b", 1.2, leads=3), _p("c", 1.3)]
    batch = take_batch(pending, 2.0, policy)
    assert [(p.device, p.arrival) for p in batch] == [("a", 1.0), ("c", 1.3)]
    assert [(p.device, p.leads) for p in pending] == [("a", 1), ("b", 3)]
    assert [p.device for p in take_batch(pending, 2.0, policy)] == ["a"]  # a's next beat, after its first
    assert [p.device for p in take_batch(pending, 2.0, policy)] == ["b"]


def test_batcher_groups_concurrent_submissions() -> None:
    seen: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        seen.append(list(batch))
        return [x * 10 for x in batch]

    batcher = BeatBatcher(run, BatchPolicy(window_s=0.2))
    try:
        futures = [batcher.submit(f"d{i}", 1, i) for i in range(3)]
        assert [f.result(timeout=5) for f in futures] == [0, 10, 20]
        assert seen == [[0, 1, 2]]
        assert batcher.submit("solo", 1, 7).result(timeout=5) == 70
    finally:
        batcher.close()


def test_batcher_reports_a_failed_batch_to_every_caller() -> None:
    def run(batch: list[int]) -> list[int]:
        raise RuntimeError("boom")

    batcher = BeatBatcher(run, BatchPolicy(window_s=0.0))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            batcher.submit("a", 1, 1).result(timeout=5)
    finally:
        batcher.close()


def test_a_cancelled_beat_is_dropped_and_the_batcher_lives_on() -> None:
    """At shutdown the engine cancels the tasks awaiting beats; their futures cancel with them."""
    seen: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        seen.append(list(batch))
        return [x * 10 for x in batch]

    batcher = BeatBatcher(run, BatchPolicy(window_s=0.3))
    try:
        gone = batcher.submit("a", 1, 1)
        kept = batcher.submit("b", 1, 2)
        assert gone.cancel()
        assert kept.result(timeout=5) == 20 and seen == [[2]]
        assert batcher.submit("a", 1, 3).result(timeout=5) == 30  # the dispatcher thread is still alive
        waiting = batcher.submit("c", 1, 4)
        waiting.cancel()
    finally:
        batcher.close()  # a cancelled future left pending at close is not an error either
    assert waiting.cancelled()


# a real tiny model on CPU


@pytest.fixture(scope="module")
def resident() -> ResidentGenerator:
    torch.set_num_threads(1)
    # padded as with graphs, so padding is exercised on CPU too
    return ResidentGenerator(Generator.untrained("tiny", device="cpu", seed=1), pad=True)


def _requests(res: ResidentGenerator, count: int) -> list[BeatRequest]:
    rng = np.random.default_rng(42)
    size, n = res.preset.tokenizer.image_size, res.preset.ecg.window_samples
    out = []
    for i in range(count):
        frames = rng.integers(0, 256, (res.preset.tokenizer.frames, size, size), dtype=np.uint8)
        state = res.prime_loop(frames, seed=100 + i) if i % 2 == 0 else res.prime_image(frames[0], seed=100 + i)
        window = rng.standard_normal((1, n)).astype(np.float32)
        valid = np.ones(n, bool)
        valid[-50 * (i + 1):] = False  # windows end at different points
        out.append(BeatRequest(state, window, valid, rr=0.7 + 0.1 * i, r_time=float(i), seed=beat_seed(100 + i, 3)))
    return out


def test_batched_generation_equals_per_device_generation(resident: ResidentGenerator) -> None:
    requests = _requests(resident, 3)  # padded to 4
    alone = [resident.generate(clone_states([r]))[0] for r in requests]
    together = resident.generate(clone_states(requests))
    for a, b in zip(alone, together):
        assert np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.frames, b.frames)
    assert len({r.tokens.tobytes() for r in together}) == 3  # different devices, different clips


def test_padding_and_batch_company_do_not_change_a_device(resident: ResidentGenerator) -> None:
    requests = _requests(resident, 5)
    five = resident.generate(clone_states(requests))             # padded to 8
    four = resident.generate(clone_states(requests[1:]))          # exactly 4
    for a, b in zip(five[1:], four):
        assert np.array_equal(a.frames, b.frames)
    assert (8, 1) in resident._buffers
    exact = ResidentGenerator(Generator.untrained("tiny", device="cpu", seed=1))  # eager default: no padding
    three = exact.generate(clone_states(requests[:3]))
    assert list(exact._buffers) == [(3, 1)]
    for a, b in zip(five[:3], three):
        assert np.array_equal(a.frames, b.frames)


def test_generate_moves_each_device_on_to_its_last_frame(resident: ResidentGenerator) -> None:
    requests = _requests(resident, 2)
    states = clone_states(requests)
    first = resident.generate(states)
    expected = [resident.prime_image(r.frames[-1], seed=0).prime for r in first]
    for state, want in zip(states, expected):
        assert torch.equal(state.state.prime, want)
    assert first[0].times[1] - first[0].times[0] == pytest.approx(requests[0].rr / resident.frames_per_beat)


def test_batching_backend_serves_concurrent_devices_in_one_batch(resident: ResidentGenerator) -> None:
    backend = BatchingBackend(resident, BatchPolicy(window_s=0.5))
    try:
        n = resident.preset.ecg.window_samples
        beats = [SimpleNamespace(index=2, r_time=1.0, rr=0.8, window=np.zeros((1, n), np.float32), valid=np.ones(n, bool))
                 for _ in range(3)]
        states = [backend.new_state(f"dev{i}") for i in range(3)]
        for s, b in zip(states, beats):  # prime outside the timed window
            backend._request(s, b)
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * 3
        started = time.monotonic()

        def render(i: int) -> None:
            results[i] = backend.render(states[i], beats[i])

        threads = [threading.Thread(target=render, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert time.monotonic() - started < 60
        assert backend.batcher.batch_sizes == [3]
        frames = [r[0] for r in results if r is not None]
        assert len(frames) == 3 and all(f.shape == (10, 64, 64) and f.dtype == np.uint8 for f in frames)
        assert not np.array_equal(frames[0], frames[1])  # each device its own heart and seed
    finally:
        backend.close()


def test_beat_seeds_never_repeat_within_a_device_and_first_beats_prime_off_the_loop(
        resident: ResidentGenerator, tmp_path) -> None:
    from echopulse.core.simulate.paired import simulate_pair

    loop = tmp_path / "loop.npz"
    sample = simulate_pair(seed=5, size=resident.preset.tokenizer.image_size, frames=30, fps=30.0)
    np.savez(loop, **{k: sample[k] for k in ("video", "video_t", "r_peaks")})
    backend = BatchingBackend(resident, BatchPolicy(window_s=0.001))
    try:
        n = resident.preset.ecg.window_samples
        beat = SimpleNamespace(index=5, r_time=1.0, rr=0.8, window=np.zeros((1, n), np.float32), valid=np.ones(n, bool))
        state = backend.new_state("dev")
        seeds = [backend._request(state, beat).seed for _ in range(2)]  # the detector restarted: index 5 again
        assert seeds == [beat_seed(state["seed"], 0), beat_seed(state["seed"], 1)]  # once both beat_seed(seed, 5)

        threads = []
        real = backend._request

        def spy(s, b):
            threads.append(threading.current_thread() is threading.main_thread())
            return real(s, b)

        backend._request = spy

        async def beats() -> None:
            fresh = backend.new_state("new")
            await backend.render_async(fresh, beat)  # its first beat: primed on a worker thread
            await backend.render_async(fresh, beat)  # later beats: built on the loop, nothing heavy left
            assert backend.references.replace({"new": str(loop)}) == ["new"]  # a SIGHUP reload gives it a loop
            await backend.render_async(fresh, beat)  # re-primed from the file: a worker thread again
            await backend.render_async(fresh, beat)
            assert backend.frame_fields(fresh) == {"prime": "reference"}
        asyncio.run(beats())
        # once [False, True, True, True]: the reload's prime ran on the event loop
        assert threads == [False, True, False, True]
    finally:
        backend.close()


def _fake_resident() -> SimpleNamespace:
    """What BatchingBackend reads of a resident generator, without a model."""
    tokenizer = SimpleNamespace(image_size=16)
    return SimpleNamespace(preset=SimpleNamespace(tokenizer=tokenizer, ecg=None), name="fake",
                           generate=lambda requests: [], warm_up=lambda batch_sizes: None)


def test_a_prime_stuck_at_stop_does_not_keep_the_event_loop_from_closing() -> None:
    # A prime waits for the lock a batch holds; a stop that comes meanwhile cancels the beat.
    # Once primed through asyncio.to_thread, whose default executor asyncio.run joins at its
    # end: the stop waited for the prime (for ever behind a wedged GPU), past stop_timeout_s.
    backend = BatchingBackend(_fake_resident(), BatchPolicy(window_s=0.001))
    entered, release = threading.Event(), threading.Event()

    def stuck(state, beat):
        entered.set()
        release.wait(10.0)
        raise RuntimeError("released")

    backend._request = stuck
    beat = SimpleNamespace(index=0, r_time=1.0, rr=0.8, window=np.zeros((1, 8), np.float32), valid=np.ones(8, bool))

    async def stop_while_priming() -> None:
        render = asyncio.create_task(backend.render_async(backend.new_state("dev"), beat))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        render.cancel()  # the engine's stop
        await asyncio.gather(render, return_exceptions=True)

    timer = threading.Timer(3.0, release.set)
    timer.start()
    try:
        t0 = time.monotonic()
        asyncio.run(stop_while_priming())
        waited = time.monotonic() - t0
    finally:
        release.set()
        timer.cancel()
        backend.close()
    assert waited < 2.0


def test_closing_an_idle_batcher_with_no_time_left_warns_of_no_batch(caplog) -> None:
    # The engine's stop passes what is left of its budget: 0 once a stuck warm-up spent it.
    # The idle dispatcher needs a moment to see the close; join(0) found it alive and the log
    # said "a batch still running", while none ran.
    import logging

    batcher = BeatBatcher(lambda batch: batch, BatchPolicy(window_s=0.0))
    assert batcher.submit("a", 1, 7).result(timeout=5.0) == 7  # the dispatcher has run, and is idle again
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.batching"):
        batcher.close(timeout=0.0)
    assert not [r for r in caplog.records if "still running" in r.getMessage()]


def test_closing_a_batcher_in_the_middle_of_a_batch_says_so(caplog) -> None:
    import logging

    started, release = threading.Event(), threading.Event()

    def slow(batch):
        started.set()
        release.wait(5.0)
        return batch

    batcher = BeatBatcher(slow, BatchPolicy(window_s=0.0))
    batcher.submit("a", 1, 7)
    assert started.wait(5.0)
    try:
        with caplog.at_level(logging.WARNING, logger="echopulse.stream.batching"):
            batcher.close(timeout=0.05)
    finally:
        release.set()
    assert [r for r in caplog.records if "still running" in r.getMessage()]
