"""The viewer's one process: ZeroMQ SUB in, WebSocket fan-out and the page's files out.

    async with ViewerServer("tcp://127.0.0.1:5556", port=8765) as viewer:
        await stop_event.wait()               # the page is at viewer.url

The page, its script and stylesheet, /health (JSON) and the WebSocket (/ws) share one
port: plain GET requests are answered in websockets' `process_request` hook, so there
is no second server and no dependency beyond `websockets`.
"""
from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import time
from collections import Counter
from importlib import resources
from typing import Iterable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..logs import RateLimitedLog
from ..protocol import FrameMessage, StatusMessage
from ..subscribe import DEFAULT_TOPICS, AsyncSubscriber
from .fanout import ClientFeed, Fanout
from .wire import event_payload, frame_payload

log = logging.getLogger(__name__)

WS_PATH = "/ws"
_FILES = {  # URL path -> (file in static/, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/viewer.js": ("viewer.js", "text/javascript; charset=utf-8"),
    "/viewer.css": ("viewer.css", "text/css; charset=utf-8"),
}


def _static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)


class ViewerServer:
    """Subscribe to `endpoint` and serve the live page on http://host:port/ (port 0: any free port)."""

    def __init__(
        self,
        endpoint: str,
        host: str = "127.0.0.1",
        port: int = 8765,
        topics: Iterable[str] = DEFAULT_TOPICS,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.endpoint = endpoint
        self.host = host
        self.port = port
        self.topics = tuple(topics)
        self.stats_interval_s = stats_interval_s
        self.frames: Counter[str] = Counter()  # frames received per device
        self._files = {path: (_static(name), kind) for path, (name, kind) in _FILES.items()}
        self._fanout = Fanout()
        self._last_frame: dict[str, bytes] = {}   # what a browser that connects now sees first
        self._last_status: dict[str, str] = {}
        # Valid messages the viewer still could not forward, and failed receives: counted, logged now and then.
        self.unforwardable = RateLimitedLog(log, "cannot forward message")
        self.recv_failures = RateLimitedLog(log, "cannot receive from the engine")
        self._sub: AsyncSubscriber | None = None
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> None:
        try:
            self._sub = AsyncSubscriber(self.endpoint, topics=self.topics)
            self._server = await serve(self._client, self.host, self.port, process_request=self._http,
                                       compression=None)  # pixels barely compress; save the CPU
        except BaseException:
            await self.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._tasks = [asyncio.create_task(self._pump(), name="viewer-pump"),
                       asyncio.create_task(self._stats(), name="viewer-stats")]
        log.info("viewer of %s at %s", self.endpoint, self.url)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._flush_logs(force=True)  # the counts the rate limit still holds back, not lost at exit
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._sub is not None:
            self._sub.close()
            self._sub = None

    async def __aenter__(self) -> "ViewerServer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- ZeroMQ side --------------------------------------------------------------------

    async def _pump(self) -> None:
        assert self._sub is not None
        while True:
            try:
                msg = await self._sub.recv(timeout=1.0)
            except Exception as err:  # the feed of every device hangs on this loop: never let it end
                self.recv_failures(f"{type(err).__name__}: {err}")
                await asyncio.sleep(0.1)
                continue
            try:
                self._dispatch(msg)
            except Exception as err:  # one odd message must not end the viewer's feed
                device = getattr(msg, "device", "?")  # not the message's repr: it holds the pixels
                self.unforwardable(f"{device}: {type(err).__name__}: {err}")

    def _dispatch(self, msg: FrameMessage | StatusMessage | None) -> None:
        if isinstance(msg, FrameMessage):
            payload = frame_payload(msg)
            self.frames[msg.device] += 1
            self._last_frame[msg.device] = payload
            self._fanout.put_frame(msg.device, payload)
        elif isinstance(msg, StatusMessage):
            payload = event_payload("status", msg.status)
            if msg.code == "stopped":
                # gone (forgotten, or the engine stopped): browsers that connect later get
                # no card for it, or every id ever seen would pile up here and on the page
                self._forget(msg.device)
            else:
                self._last_status[msg.device] = payload
            self._fanout.put_event(payload)

    def _forget(self, device: str) -> None:
        """Drop all the viewer keeps per device: a viewer that runs for months sees ids come and go."""
        self._last_frame.pop(device, None)
        self._last_status.pop(device, None)
        self.frames.pop(device, None)
        if self._sub is not None:
            for per_device in (self._sub.last_seq, self._sub.lost, self._sub.restarts):
                per_device.pop(device, None)

    async def _stats(self) -> None:
        assert self._sub is not None
        while True:
            await asyncio.sleep(self.stats_interval_s)
            self._flush_logs()
            for feed in self._fanout.clients:
                feed.put_event(self._stats_payload(feed))

    def _flush_logs(self, force: bool = False) -> None:
        """Report the bad messages held back by the rate limit, once its interval has passed
        (`force`: now, as the viewer closes)."""
        for limited in (self.unforwardable, self.recv_failures, *([self._sub.malformed] if self._sub else [])):
            limited.flush(force)

    def _problems(self) -> dict[str, object]:
        """The counts of messages dropped, for /health and the page."""
        sub = self._sub
        return {"malformed": sub.errors if sub else 0, "last_malformed": sub.malformed.last if sub else "",
                "unforwardable": self.unforwardable.count, "recv_failures": self.recv_failures.count}

    def _stats_payload(self, feed: ClientFeed) -> str:
        assert self._sub is not None
        return event_payload("stats", {
            "endpoint": self.endpoint, "frames": dict(self.frames), "lost": dict(self._sub.lost),
            "restarts": dict(self._sub.restarts), "skipped": feed.skipped, "time": time.time(),
            **self._problems(),
        })

    # -- browser side -------------------------------------------------------------------

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == WS_PATH:
            return None  # go on with the WebSocket handshake
        if path == "/health":
            body = json.dumps({"status": "ok", "endpoint": self.endpoint, "frames": dict(self.frames),
                               "clients": len(self._fanout.clients), **self._problems()}).encode()
            return _response(http.HTTPStatus.OK, body, "application/json")
        if path in self._files:
            body, kind = self._files[path]
            return _response(http.HTTPStatus.OK, body, kind)
        return _response(http.HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8")

    async def _client(self, connection: ServerConnection) -> None:
        feed = self._fanout.add()
        log.info("browser connected from %s", connection.remote_address)
        # Sent ahead of the feed, whose few event slots would drop all but the last ~60
        # devices' statuses (and the hello) of a ward's worth.
        replay = [event_payload("hello", {"endpoint": self.endpoint, "version": 1}), *self._last_status.values()]
        for device, payload in self._last_frame.items():
            feed.put_frame(device, payload)
        # The sender may sit in take() or in a slow send: watch the connection itself so
        # a browser that leaves is forgotten at once.
        sender = asyncio.create_task(self._send_loop(connection, feed, replay), name="viewer-send")
        closed = asyncio.create_task(connection.wait_closed(), name="viewer-closed")
        try:
            await asyncio.wait([sender, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, closed):
                task.cancel()
            await asyncio.gather(sender, closed, return_exceptions=True)
            self._fanout.remove(feed)
            log.info("browser %s gone (%d frames skipped for it)", connection.remote_address, feed.skipped)

    @staticmethod
    async def _send_loop(connection: ServerConnection, feed: ClientFeed, replay: list[str]) -> None:
        with contextlib.suppress(ConnectionClosed):
            for payload in replay:
                await connection.send(payload)
            while True:
                for payload in await feed.take(timeout=1.0):
                    await connection.send(payload)
