"""`echopulse view`: a live web page of every device's echo, beats, heart rate, status and latency.

One asyncio process: a ZeroMQ SUB on the engine's publisher fans frames out to the
browsers connected over a WebSocket (each browser gets the newest frame per device; a
slow one skips frames rather than lagging), and the same port serves the page itself
(`static/`: HTML, CSS and vanilla JS, nothing fetched from elsewhere).
"""
from .server import ViewerServer

__all__ = ["ViewerServer"]
