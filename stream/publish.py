"""ZeroMQ PUB side of protocol v1: frames and status messages out to any number of subscribers.

A PUB socket never blocks: past the high-water mark (per subscriber) ZeroMQ drops
messages silently, which is why every frame header carries a per-device `seq` that
subscribers use to count what they missed. Not thread-safe: publish from one thread
(the engine's event loop).
"""
from __future__ import annotations

import logging
import math
import struct
import time
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import zmq

from . import protocol
from .protocol import ProtocolError

log = logging.getLogger(__name__)

DEFAULT_HWM = 10_000  # messages per subscriber; ~160 MB of 128x128 frames at most

_SNDMORE = int(zmq.SNDMORE)
# The per-frame fields, packed as msgpack by hand after the beat's constant fields:
# key (fixstr), then uint64 / uint32 / float64 values (valid msgpack, fixed widths).
_VAR_FIELDS = ("seq", "frame", "t", "publish", "latency")
_KEYS = tuple(msgpack.packb(k) for k in _VAR_FIELDS)
_FRAME_VARS = struct.Struct(
    ">" + "".join(f"{len(k)}s{code}" for k, code in zip(_KEYS, ("BQ", "BI", "Bd", "Bd", "Bd")))
)


def _beat_header_prefix(base: dict[str, Any]) -> bytes:
    """msgpack map header plus every field that is the same for all frames of a beat."""
    const = {k: v for k, v in base.items() if k not in _VAR_FIELDS}
    packer = msgpack.Packer()
    body = b"".join(packer.pack(k) + packer.pack(v) for k, v in const.items())
    return packer.pack_map_header(len(const) + len(_VAR_FIELDS)) + body


class Publisher:
    """Bind a PUB socket at `endpoint` and send protocol-v1 messages.

    ``endpoint`` may be one address or several; port 0 (``tcp://127.0.0.1:0``) binds a
    free port, and the bound addresses are in :attr:`endpoints` (:attr:`endpoint` is the
    first) afterwards. Use as a context manager or call :meth:`close`.

    last_value_cache: bind an XPUB socket instead, which sees subscriptions, and keep the
    latest status of every device; a subscriber that joins later gets those statuses at
    once (with ``"cached": true`` added, so it can tell a replay from a new event;
    subscribers already there may see the replay too). Subscriptions are served by
    :meth:`serve_subscriptions`, which every publish call and the engine's watchdog run.
    Frames are not cached: a new one comes within a beat, and a replayed frame would
    break the per-device seq. :meth:`forget` drops a device that is gone for good.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str],
        *,
        hwm: int = DEFAULT_HWM,
        context: zmq.Context | None = None,
        last_value_cache: bool = False,
    ) -> None:
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._socket = self._context.socket(zmq.XPUB if last_value_cache else zmq.PUB)
        # Options first: SNDHWM only applies to connections made after it is set.
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if last_value_cache:
            self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every join, even to a topic already subscribed
        # One socket may bind several endpoints (loopback for local viewers, an interface
        # for the ward network): every subscriber sees the same sequence numbers.
        self.endpoints: list[str] = []
        for address in [endpoint] if isinstance(endpoint, str) else list(endpoint):
            try:
                self._socket.bind(address)
            except zmq.ZMQError as err:
                self.close()
                raise OSError(f"cannot bind {address}: {err}") from None
            self.endpoints.append(self._socket.getsockopt_string(zmq.LAST_ENDPOINT))
        if not self.endpoints:
            self.close()
            raise ValueError("a Publisher needs at least one endpoint")
        self.endpoint: str = self.endpoints[0]
        self._seq: dict[str, int] = {}
        self._cache: dict[bytes, dict[str, Any]] | None = {} if last_value_cache else None
        self.frames_sent = 0
        self.status_sent = 0

    def serve_subscriptions(self) -> int:
        """Answer new subscriptions with the cached statuses (XPUB only); never blocks.

        Returns the number of subscriptions seen."""
        if self._cache is None:
            return 0
        seen = 0
        while True:
            try:
                event = self._socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return seen
            if not event or event[0] != 1:
                continue  # an unsubscription
            seen += 1
            prefix = event[1:]
            for topic, status in list(self._cache.items()):
                if topic.startswith(prefix):
                    self._socket.send_multipart(protocol.encode_status({**status, "cached": True}))

    def forget(self, device: str) -> None:
        """Drop what is kept for `device` (its cached status, its seq): a device the engine
        forgot must not reach late joiners ever after, nor hold memory; if it comes back,
        its seq starts again at 0, as for a new device."""
        self._seq.pop(device, None)
        if self._cache is not None:
            self._cache.pop(protocol.status_topic(device), None)

    def next_seq(self, device: str) -> int:
        """The seq the next frame of `device` will carry."""
        return self._seq.get(device, 0)

    def publish_frames(
        self,
        device: str,
        frames: np.ndarray,
        *,
        times: Sequence[float],
        beat: int,
        r_time: float,
        rr: float,
        model: str,
        capture: float,
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Send one beat's frames (F×H×W uint8), one message each; return the number sent.

        `times` are the frames' ECG times (s). `capture` is the wall-clock time the ECG
        that completed the beat arrived. `frames` must not be modified afterwards: the
        pixels leave zero-copy.
        """
        if frames.ndim != 3 or frames.dtype != np.uint8:
            raise ProtocolError(f"frames must be F×H×W uint8, got shape {frames.shape} {frames.dtype}")
        n = frames.shape[0]
        if len(times) != n:
            raise ProtocolError(f"{n} frames but {len(times)} times")
        frames = np.ascontiguousarray(frames)
        if self._cache is not None:
            self.serve_subscriptions()
        seq = self._seq.get(device, 0)
        base = {
            "v": protocol.VERSION, "device": device, "seq": seq, "beat": int(beat), "frame": 0, "frames": n,
            "t": float(times[0]) if n else 0.0, "r_time": float(r_time), "rr": float(rr),
            "hr": 60.0 / rr if rr > 0 else math.nan, "shape": list(frames.shape[1:]), "dtype": "uint8",
            "model": model, "capture": float(capture), "publish": time.time(), "latency": 0.0,
            **(extra or {}),
        }
        # Validate the beat's fields once; per frame only numbers we compute change.
        protocol.validate_header(base)
        head = _beat_header_prefix(base)
        topic = protocol.frame_topic(device)
        send = self._socket.send
        t_list = [float(t) for t in times]
        capture = base["capture"]
        k_seq, k_frame, k_t, k_pub, k_lat = _KEYS
        for i, pixels in enumerate(frames):
            now = time.time()
            header = head + _FRAME_VARS.pack(
                k_seq, 0xCF, seq + i, k_frame, 0xCE, i, k_t, 0xCB, t_list[i], k_pub, 0xCB, now, k_lat, 0xCB, now - capture
            )
            # Plain int flags: pyzmq's enum arithmetic in send_multipart costs ~2 µs a frame.
            # copy=False: pyzmq copies parts below its 64 kB threshold anyway, so only big
            # frames go out without a copy.
            send(topic, _SNDMORE)
            send(header, _SNDMORE)
            send(pixels, 0, copy=False)
        self._seq[device] = seq + n
        self.frames_sent += n
        return n

    def publish_status(
        self, device: str, code: str, message: str = "", counters: Mapping[str, float] | None = None
    ) -> None:
        """Send one status event on ``status/<device>``."""
        status = {
            "v": protocol.VERSION, "device": device, "code": code, "message": message,
            "counters": dict(counters or {}), "time": time.time(),
        }
        parts = protocol.encode_status(status)
        if self._cache is not None:
            self.serve_subscriptions()
            self._cache[parts[0]] = status
        self._socket.send_multipart(parts)
        self.status_sent += 1

    def close(self) -> None:
        """Close the socket (dropping anything unsent: LINGER 0) and the context if we made it."""
        if not self._socket.closed:
            self._socket.close(linger=0)
        if self._own_context and not self._context.closed:
            self._context.term()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
