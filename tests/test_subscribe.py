"""Subscriber timeouts under a flood of malformed messages, and `echopulse subscribe`'s capture
(bounded memory without --out, frames of several sizes, a closed stdout), over real loopback sockets."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from echopulse.stream.cli import main
from echopulse.stream.publish import Publisher
from echopulse.stream.subscribe import AsyncSubscriber, Subscriber

pytestmark = pytest.mark.network

FLOOD_S = 6.0  # how long a flood lasts at most: a recv that waits it out took far longer than asked


class Flood(threading.Thread):
    """A PUB socket sending nothing but v2 frame headers (malformed for v1), one every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.endpoint = ""
        self.ready = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUB)
        try:
            socket.bind("tcp://127.0.0.1:0")
            self.endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
            self.ready.set()
            header = msgpack.packb({"v": 2, "device": "dev1"})
            end = time.monotonic() + FLOOD_S
            while time.monotonic() < end and not self._halt.wait(0.02):
                socket.send_multipart([b"echo/dev1", header, b"\0" * 16])
        finally:
            socket.close(linger=0)
            context.term()

    def __enter__(self) -> "Flood":
        self.start()
        assert self.ready.wait(5), "flood did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(5)


def test_recv_timeout_holds_while_only_malformed_messages_arrive():
    with Flood() as flood, Subscriber(flood.endpoint) as sub:
        deadline = time.monotonic() + 4.0
        while sub.errors < 5 and time.monotonic() < deadline:
            started = time.monotonic()
            assert sub.recv(timeout=0.2) is None
            assert time.monotonic() - started < 1.0  # once: every bad message restarted the 0.2 s
    assert sub.errors >= 5


async def test_async_recv_timeout_holds_while_only_malformed_messages_arrive():
    with Flood() as flood:
        async with AsyncSubscriber(flood.endpoint) as sub:
            deadline = time.monotonic() + 4.0
            while sub.errors < 5 and time.monotonic() < deadline:
                started = time.monotonic()
                assert await sub.recv(timeout=0.2) is None
                assert time.monotonic() - started < 1.0
            assert sub.errors >= 5


def test_record_duration_ends_while_only_malformed_messages_arrive(tmp_path):
    with Flood() as flood:
        started = time.monotonic()
        assert main(["record", flood.endpoint, "--out", str(tmp_path / "rec"), "--duration", "0.5"]) == 0
        assert time.monotonic() - started < 3.0  # once: ran until the flood stopped


def test_subscribe_timeout_ends_while_only_malformed_messages_arrive(capsys):
    with Flood() as flood:
        started = time.monotonic()
        assert main(["subscribe", flood.endpoint, "--timeout", "0.5", "--summary"]) == 0
        assert time.monotonic() - started < 3.0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("frames=0 ") and "malformed=0" not in line  # the flood did reach it


def test_watch_without_out_keeps_counts_not_headers():
    from echopulse.stream.cli.subscribe import Capture

    header = {"device": "bed1", "ecg": b"\0" * 1000}
    capture = Capture(keep=False)
    for _ in range(100):
        capture.add_frame(header, np.zeros((8, 8), np.uint8))
    capture.add_status({"device": "bed1"})
    assert (capture.frames, capture.statuses, capture.devices) == (100, 1, {"bed1"})
    assert capture.by_shape == {} and capture.status_maps == []  # once: every header, forever
    saving = Capture(keep=True)
    saving.add_frame(header, np.zeros((8, 8), np.uint8))
    assert [len(h) for _, h in saving.by_shape.values()] == [1]


def _publish_until(thread: threading.Thread, pub: Publisher, sizes: dict[str, int], timeout: float = 10.0) -> None:
    """Send a beat per device every 50 ms while `thread` (the command) runs: slow joiner."""
    deadline = time.monotonic() + timeout
    beat = 0
    while thread.is_alive() and time.monotonic() < deadline:
        for device, side in sizes.items():
            pub.publish_frames(device, np.full((4, side, side), beat % 256, np.uint8), times=[0.0, 0.1, 0.2, 0.3],
                               beat=beat, r_time=0.0, rr=0.8, model="sim", capture=time.time())
        beat += 1
        time.sleep(0.05)


def test_subscribe_out_saves_frames_of_every_size(tmp_path, capsys):
    out = tmp_path / "got.npz"
    with Publisher("tcp://127.0.0.1:0") as pub:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("rc", main(
            ["subscribe", pub.endpoint, "--topic", "echo/", "--count", "12", "--timeout", "10", "--out", str(out)])))
        thread.start()
        _publish_until(thread, pub, {"big": 16, "small": 8})
        thread.join(timeout=5)
    assert result["rc"] == 0  # once: a CliError after the capture, and no file
    saved = {}  # file name -> (device, frame shape, frames)
    for path in tmp_path.glob("*.npz"):
        with np.load(path) as z:
            assert len(z["frames"]) == len(z["seq"]) == len(z["headers"]) > 0
            (device,) = set(z["device"])
            saved[path.name] = (device, z["frames"].shape[1:], len(z["frames"]))
    assert sorted((d, shape) for d, shape, _ in saved.values()) == [("big", (16, 16)), ("small", (8, 8))]
    assert sum(n for _, _, n in saved.values()) == 12
    (other,) = set(saved) - {"got.npz"}  # the first size received: got.npz; the other beside it
    h, w = saved[other][1]
    assert other == f"got_{h}x{w}.npz"


def test_subscribe_out_saves_when_stdout_closes(tmp_path):
    out = tmp_path / "got.npz"
    with Publisher("tcp://127.0.0.1:0") as pub:
        proc = subprocess.Popen([sys.executable, "-m", "echopulse.stream.cli", "subscribe", pub.endpoint, "--topic",
                                 "echo/", "--timeout", "10", "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"})
        try:
            waiter = threading.Thread(target=proc.stdout.readline)  # what `| head -1` does
            waiter.start()
            _publish_until(waiter, pub, {"bed1": 8})
            waiter.join(timeout=5)
            proc.stdout.close()
            thread = threading.Thread(target=proc.wait)
            thread.start()
            _publish_until(thread, pub, {"bed1": 8})  # the next line it prints meets the closed pipe
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0 and b"Traceback" not in err and b"Exception" not in err, err.decode()[-2000:]
    with np.load(out) as z:  # once: BrokenPipeError, and no file
        assert len(z["frames"]) >= 2 and list(z["seq"]) == sorted(z["seq"])


def _quiet_after_bad_messages(sub, pub, count: int = 3) -> None:
    """Send bad messages until `sub` has seen one (a slow joiner misses the first), then `count` more."""
    bad = [b"echo/dev1", msgpack.packb({"v": 2, "device": "dev1"}), b"\0" * 16]
    deadline = time.monotonic() + 5.0
    while sub.errors == 0 and time.monotonic() < deadline:
        pub.send_multipart(bad)
        sub.recv(timeout=0.05)
    for _ in range(count):
        pub.send_multipart(bad)


def _malformed_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropping malformed message")]


@pytest.fixture
def pub_socket():
    context = zmq.Context()
    socket = context.socket(zmq.PUB)
    socket.setsockopt(zmq.LINGER, 0)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield socket, f"tcp://127.0.0.1:{port}"
    socket.close()
    context.term()


def test_bad_messages_held_back_are_logged_when_their_interval_ends_though_none_follow(pub_socket, caplog):
    import logging

    from echopulse.stream.logs import RateLimitedLog

    pub, endpoint = pub_socket
    with Subscriber(endpoint) as sub, caplog.at_level(logging.WARNING, logger="echopulse.stream.subscribe"):
        sub.malformed = RateLimitedLog(logging.getLogger("echopulse.stream.subscribe"), "dropping malformed message",
                                       interval_s=0.5)
        _quiet_after_bad_messages(sub, pub)
        assert sub.recv(timeout=1.5) is None  # waiting for a good message; the bad ones stopped
        lines = _malformed_lines(caplog)
    # once: the ones after the first were written only if another bad message came after 10 s
    assert len(lines) == 2 and lines[1].endswith(f"({sub.errors} in all; {sub.errors - 1} since the last report)")


def test_bad_messages_held_back_are_logged_when_the_subscriber_closes(pub_socket, caplog):
    import logging

    pub, endpoint = pub_socket
    with caplog.at_level(logging.WARNING, logger="echopulse.stream.subscribe"):
        with Subscriber(endpoint) as sub:
            _quiet_after_bad_messages(sub, pub)
            while sub.recv(timeout=0.3) is not None:
                pass
            assert len(_malformed_lines(caplog)) == 1  # within the 10 s: held back
        lines = _malformed_lines(caplog)
    assert len(lines) == 2 and f"({sub.errors} in all;" in lines[1]
