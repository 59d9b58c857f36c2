"""Structured logs: `--log-format json` and `[log] format = "json"` give one JSON object per line."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from echopulse.stream.config_file import ConfigError, load_config
from echopulse.stream.logs import JsonFormatter, configure


def test_json_formatter_keeps_extra_fields_and_exceptions() -> None:
    logger = logging.getLogger("echopulse.test")
    record = logger.makeRecord("echopulse.test", logging.WARNING, __file__, 1, "device %s lost", ("d1",), None,
                               extra={"device": "d1", "beats": 3})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "device d1 lost" and entry["level"] == "warning"
    assert entry["device"] == "d1" and entry["beats"] == 3 and entry["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord("echopulse.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]


def test_configure_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="text, json"):
        configure(logging.INFO, "xml")


def test_cli_logs_json_lines(tmp_path: Path) -> None:
    # simulate logs "wrote N samples" at INFO; with -v and --log-format json every stderr line
    # that is not the progress bar is a JSON object.
    out = subprocess.run([sys.executable, "-m", "echopulse.stream.cli", "-v", "--log-format", "json", "simulate",
                          "--n", "1", "--seed", "1", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.replace("\r", "\n").splitlines() if line.startswith("{")]
    assert any(r["logger"].startswith("echopulse") and "wrote 1 samples" in r["message"] for r in records)


def test_config_log_format(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('sources = ["synthetic://?devices=1"]\ndata_dir = "d"\n[log]\nlevel = "debug"\nformat = "json"\n')
    config = load_config(good)
    assert (config.log_level, config.log_format) == ("debug", "json")
    bad = tmp_path / "bad.toml"
    bad.write_text('sources = ["synthetic://?devices=1"]\ndata_dir = "d"\n[log]\nformat = "xml"\n')
    with pytest.raises(ConfigError, match="format"):
        load_config(bad)
