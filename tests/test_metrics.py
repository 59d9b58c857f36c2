"""/metrics and /health over real HTTP on a free loopback port."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from echopulse.stream.metrics import MetricsServer, metric_name, render_prometheus

pytestmark = pytest.mark.network

COUNTERS = {
    "strap-1": {"beats": 12, "frames": 132, "beats_dropped": 1},
    'odd"dev': {"beats": 3},
    "_engine": {"refused_chunks": 2},
}


def _get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def test_metric_names_are_prometheus_safe():
    assert metric_name("beats_dropped") == "echopulse_beats_dropped_total"
    assert metric_name("issue_fs-change") == "echopulse_issue_fs_change_total"


def test_exposition_groups_samples_under_one_help_and_type():
    text = render_prometheus(COUNTERS, uptime_s=1.5)
    lines = text.splitlines()
    assert lines.count("# TYPE echopulse_beats_total counter") == 1
    beats = [x for x in lines if x.startswith("echopulse_beats_total{")]
    assert beats == ['echopulse_beats_total{device="odd\\"dev"} 3', 'echopulse_beats_total{device="strap-1"} 12']
    assert 'echopulse_refused_chunks_total{device="_engine"} 2' in lines
    assert "echopulse_devices 2" in lines  # _engine is not a device
    # Every sample line follows its metric's TYPE line.
    typed = {x.split()[2] for x in lines if x.startswith("# TYPE")}
    assert {x.split("{")[0].split()[0] for x in lines if not x.startswith("#")} <= typed


async def test_metrics_and_health_over_http():
    calls = []

    def counters():
        calls.append(1)
        return COUNTERS

    async with MetricsServer(counters, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.port}"
        status, kind, body = await asyncio.wait_for(asyncio.to_thread(_get, base + "/metrics"), 10)
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        assert 'echopulse_frames_total{device="strap-1"} 132' in body.splitlines()
        status, kind, body = await asyncio.wait_for(asyncio.to_thread(_get, base + "/health"), 10)
        health = json.loads(body)
        assert status == 200 and kind == "application/json"
        assert health["status"] == "ok" and health["devices"] == ['odd"dev', "strap-1"]
        assert health["counters"]["strap-1"]["beats_dropped"] == 1
        assert (await asyncio.wait_for(asyncio.to_thread(_get, base + "/nope"), 10))[0] == 404
        assert (await asyncio.wait_for(asyncio.to_thread(_get, base + "/metrics", "POST"), 10))[0] == 405
    assert len(calls) == 2  # counters are read per request, never cached


async def test_how_devices_were_primed_is_a_gauge_and_in_health():
    """An operator sees which patients run on a simulated heart, and loops no device claimed."""
    primes = {"devices": {"strap-1": "reference", 'odd"dev': "simulated"}, "references_waiting": ["strap_2"]}
    async with MetricsServer(lambda: COUNTERS, "127.0.0.1", 0, primes_fn=lambda: primes) as server:
        base = f"http://127.0.0.1:{server.port}"
        body = (await asyncio.wait_for(asyncio.to_thread(_get, base + "/metrics"), 10))[2].splitlines()
        assert 'echopulse_primed_with_reference{device="strap-1"} 1' in body
        assert 'echopulse_primed_with_reference{device="odd\\"dev"} 0' in body
        assert "echopulse_references_waiting 1" in body
        assert body.count("# TYPE echopulse_primed_with_reference gauge") == 1
        health = json.loads((await asyncio.wait_for(asyncio.to_thread(_get, base + "/health"), 10))[2])
        assert health["primes"] == primes
    # without a primes callback (the sim backend's serve has one too, empty) nothing is added
    assert "primed" not in render_prometheus(COUNTERS, 1.0)


async def test_a_failing_callback_is_a_500_and_the_server_lives_on():
    state = {"fail": True}

    def counters():
        if state["fail"]:
            raise RuntimeError("engine not ready")
        return {"a": {"beats": 1}}

    async with MetricsServer(counters, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert (await asyncio.wait_for(asyncio.to_thread(_get, url), 10))[0] == 500
        state["fail"] = False
        status, _, body = await asyncio.wait_for(asyncio.to_thread(_get, url), 10)
        assert status == 200 and 'echopulse_beats_total{device="a"} 1' in body


async def test_garbage_request_gets_400():
    async with MetricsServer(lambda: {}, "127.0.0.1", 0) as server:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", server.port), 5)
        writer.write(b"HELLO\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 5)
        assert reply.startswith(b"HTTP/1.1 400")
