"""ZeroMQ publish throughput: our Publisher (protocol v1 headers) vs a bare pyzmq send loop.

Both send 128×128 uint8 frames PUB→SUB over loopback TCP in the same run, to the same
receiver (a separate process counting multipart messages, as a real subscriber is).
Two figures per side:
- delivered: frames received / (last receive − first send), what a subscriber gets
  (perf_counter in two processes: one system-wide monotonic clock on Linux, macOS, Windows);
- send: frames / time spent in the send loop, where our per-frame header work shows.
Bare and ours run back to back `repeats` times, which one goes first alternating (the
second of a pair meets the machine the first left: caches, clocks, a receiver exiting);
each ratio is the median over the pairs. The high-water mark is set high enough that
nothing is dropped (reported).
"""
from __future__ import annotations

import multiprocessing
import time

import msgpack
import numpy as np
import zmq

from echopulse.stream.publish import Publisher

SIZE = 128
FRAMES_PER_BEAT = 10
HWM = 100_000  # no drops: the receiver may lag, the queue absorbs it (<= frames × 16 kB)


def _receive(endpoint: str, conn) -> None:
    """Receiver process: count messages on echo/ until `expected` arrive or 0.5 s of silence."""
    context = zmq.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(endpoint)
    try:
        sock.recv_multipart()  # the first probe: we are joined
        conn.send("joined")
        expected = conn.recv()
        while sock.recv_multipart()[0] != b"echo/bench":
            pass  # leftover probes
        count, last = 1, time.perf_counter()
        while count < expected and sock.poll(500):
            sock.recv_multipart(copy=False)
            count += 1
            last = time.perf_counter()
        conn.send((count, last))
    finally:
        sock.close(linger=0)
        context.term()


def _measure(kind: str, n_beats: int) -> dict:
    context = zmq.Context()
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES_PER_BEAT, SIZE, SIZE), dtype=np.uint8)
    times = np.arange(FRAMES_PER_BEAT) * 0.08
    n = n_beats * FRAMES_PER_BEAT
    pub = sock = None
    try:
        if kind == "ours":
            pub = Publisher("tcp://127.0.0.1:0", hwm=HWM, context=context)
            endpoint = pub.endpoint

            def probe() -> None:
                pub.publish_status("probe", "source", "probe")

            def send_all() -> None:
                for b in range(n_beats):
                    pub.publish_frames("bench", frames, times=times + b * 0.8, beat=b, r_time=b * 0.8, rr=0.8,
                                       model="sim", capture=time.time())
        else:
            sock = context.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind("tcp://127.0.0.1:0")
            endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            header = msgpack.packb({"device": "bench", "seq": 0, "shape": [SIZE, SIZE]})

            def probe() -> None:
                sock.send_multipart([b"status/probe", header])

            def send_all() -> None:
                for b in range(n_beats):
                    for i in range(FRAMES_PER_BEAT):
                        sock.send_multipart([b"echo/bench", header, frames[i]], copy=False)

        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        proc = mp.Process(target=_receive, args=(endpoint, child), daemon=True)
        proc.start()
        try:
            deadline = time.monotonic() + 20.0
            while not parent.poll(0.01):  # slow joiner: probe until the receiver has one
                if time.monotonic() > deadline:
                    raise TimeoutError("receiver never joined")
                probe()
            parent.recv()
            parent.send(n)
            t0 = time.perf_counter()
            send_all()
            t_sent = time.perf_counter()
            if not parent.poll(30):
                raise TimeoutError("receiver did not finish")
            received, last = parent.recv()
        finally:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        return {
            "delivered_fps": received / (last - t0),
            "send_fps": n / (t_sent - t0),
            "dropped_fraction": 1.0 - received / n,
        }
    finally:
        if pub is not None:
            pub.close()
        if sock is not None:
            sock.close(linger=0)
        context.term()


def _pair(n_beats: int, ours_first: bool) -> tuple[dict, dict]:
    """(bare, ours), measured in the order asked."""
    if ours_first:
        ours = _measure("ours", n_beats)
        return _measure("bare", n_beats), ours
    bare = _measure("bare", n_beats)
    return bare, _measure("ours", n_beats)


def run(quick: bool) -> dict:
    n_beats = 400 if quick else 2000
    repeats = 6 if quick else 8  # even: each side goes first as often
    order = [i % 2 == 1 for i in range(repeats)]
    pairs = []
    # Bare and ours back to back, `repeats` times: each pair shares the machine's load of
    # the moment, so the median of the pair ratios is steadier than a ratio of averages.
    for ours_first in order:
        pairs.append(_pair(n_beats, ours_first))
    ratio = float(np.median([o["delivered_fps"] / b["delivered_fps"] for b, o in pairs]))
    send_ratio = float(np.median([o["send_fps"] / b["send_fps"] for b, o in pairs]))
    bare = max((b for b, _ in pairs), key=lambda r: r["delivered_fps"])
    ours = max((o for _, o in pairs), key=lambda r: r["delivered_fps"])
    mb = SIZE * SIZE / 1e6
    rows = [
        {"metric": "bare pyzmq loop, delivered 128x128 frames/s (best)", "value": bare["delivered_fps"], "unit": "frames/s", "target": None},
        {"metric": "Publisher (v1 headers), delivered 128x128 frames/s (best)", "value": ours["delivered_fps"], "unit": "frames/s", "target": None},
        {"metric": "Publisher / bare, delivered (median of pairs)", "value": ratio, "unit": "x", "target": ">= 0.8"},
        {"metric": "Publisher / bare, send loop only (median of pairs)", "value": send_ratio, "unit": "x", "target": None},
        {"metric": "Publisher delivered bandwidth (best)", "value": ours["delivered_fps"] * mb, "unit": "MB/s", "target": None},
        {"metric": "Publisher dropped at HWM (worst)", "value": max(o["dropped_fraction"] for _, o in pairs), "unit": "fraction", "target": None},
    ]
    return {"rows": rows, "pairs": pairs, "ours_first": order, "frames": n_beats * FRAMES_PER_BEAT, "size": SIZE}


if __name__ == "__main__":
    for row in run(quick=True)["rows"]:
        print(f"{row['metric']:<55} {row['value']:>12.4g} {row['unit']}")
