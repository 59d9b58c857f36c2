"""`echopulse view`: watch every device of a running engine in the browser.

    echopulse view --connect tcp://HOST:5556 [--port 8765] [--host 127.0.0.1] [--topic PREFIX]

Serves http://HOST:PORT/ (open it in a browser): one card per device with the live echo,
the beat / ECG strip, heart rate, status messages and latency. Stops on Ctrl-C or
SIGTERM. --host 0.0.0.0 shows the page to other machines: there is no authentication.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from .args import CliError, ranged

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("view", help="live web viewer of a running engine's frames",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", required=True,
                   help="ZeroMQ endpoint of the engine's publisher, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--port", type=ranged(int, 0, 65535, "port"), default=8765,
                   help="HTTP port (default %(default)s; 0: any free)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default %(default)s)")
    p.add_argument("--topic", action="append", default=None,
                   help="topic prefix to subscribe to (repeatable; default: echo/ and status/)")
    p.set_defaults(handler=handle)


async def _serve(args: argparse.Namespace) -> None:
    from ..subscribe import DEFAULT_TOPICS
    from ..viewer import ViewerServer

    viewer = ViewerServer(args.connect, args.host, args.port, topics=args.topic or DEFAULT_TOPICS)
    try:
        await viewer.start()
    except OSError as err:
        raise CliError(f"cannot serve on {args.host}:{args.port} or connect to {args.connect}: {err}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Logged at WARNING so the address shows without -v: it is what the user needs next.
    log.warning("viewer of %s: open %s", args.connect, viewer.url)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await viewer.close()


def handle(args: argparse.Namespace) -> int:
    asyncio.run(_serve(args))
    return 0
