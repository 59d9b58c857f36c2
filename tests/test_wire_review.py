"""Review fixes: HEAD on the metrics server, strict JSON in /health, one TYPE per metric
name, the version named first in a protocol error, and empty device ids in the raw store."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import msgpack
import numpy as np
import pytest

from echopulse.bridges.chunk import EcgChunk
from echopulse.stream import datadir, protocol
from echopulse.stream.metrics import MetricsServer, render_prometheus


def _fetch(url: str, method: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as answer:
        return answer.status, dict(answer.headers), answer.read()


@pytest.mark.network
async def test_head_answers_like_get_without_a_body():
    async with MetricsServer(lambda: {"dev": {"frames": 3}}, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}/metrics"
        status, headers, body = await asyncio.to_thread(_fetch, url, "HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Type"].startswith("text/plain")


@pytest.mark.network
async def test_health_is_strict_json_even_with_a_nan_counter():
    async with MetricsServer(lambda: {"dev": {"lag": float("nan")}}, "127.0.0.1", 0) as server:
        url = f"http://127.0.0.1:{server.port}/health"
        status, _, body = await asyncio.to_thread(_fetch, url, "GET")

    def refuse(token: str) -> None:
        raise ValueError(token)

    assert status == 200
    assert json.loads(body, parse_constant=refuse)["counters"]["dev"]["lag"] is None


def test_counters_that_sanitize_to_one_name_share_one_help_and_type():
    lines = render_prometheus({"dev": {"a-b": 1, "a_b": 2}}, uptime_s=0.0).splitlines()
    assert lines.count("# TYPE echopulse_a_b_total counter") == 1
    assert lines.count("# HELP echopulse_a_b_total") <= 1
    samples = [x for x in lines if x.startswith("echopulse_a_b_total{")]
    assert samples == ['echopulse_a_b_total{device="dev"} 3']  # one series per label set


def test_a_later_version_is_reported_as_such_even_with_fields_missing():
    header = msgpack.packb({"v": 2, "device": "dev", "new_field": 1})
    with pytest.raises(protocol.ProtocolError, match="version"):
        protocol.decode([b"echo/dev", header, b""])


def test_an_empty_device_id_does_not_write_into_the_data_dir_root(tmp_path):
    store = datadir.DataDir(tmp_path)
    chunk = EcgChunk("", np.zeros((1, 4), dtype=np.float32), 250.0, 0.0, 0, "mV")
    with pytest.raises(ValueError):
        store.append(chunk)
    store.close()
    assert not (tmp_path / datadir.SAMPLES_FILE).exists()
