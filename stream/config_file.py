"""`echopulse serve --config FILE.toml`: the daemon's settings in one file, checked before anything starts.

Schema (every key but `sources` and `data_dir` is optional; unknown keys are errors, so a
typo never passes silently; deploy/echopulse.toml is a commented example)::

    sources  = ["mqtt://broker:1883/ecg/+", ...]   # as `serve --source`, at least one
    data_dir = "/var/lib/echopulse"                # raw ECG per device; relative: to this file's folder
    duration_s = 3600.0                            # stop after this long (default: run until stopped)

    [backend]
    name = "sim"                  # "sim" or "model" (default: model when installed, else sim)
    checkpoint = "path"           # model only: checkpoint folder (default: the shipped model)
    torch_device = "cpu"          # model only: "cpu", "cuda", "cuda:1"
    batching = true               # model only: beats of all devices share generator calls (default: on CUDA)
    batch_window_ms = 4.0         # model + batching: longest a beat waits for company
    precision = "bf16"            # model + batching: "fp32" or "bf16"
    cuda_graphs = true            # model + batching on CUDA: replay captured graphs (default true)
    compile = false               # model + batching: torch.compile the models (slow start, ~6 % on GPU)
    warm_up_batch = 8             # model + batching: batch sizes up to this one made ready at start (default 1)
    size = 64                     # sim only: frame side in pixels
    frames_per_beat = 10          # sim only

    [publish]
    endpoints = ["tcp://0.0.0.0:5556"]   # ZeroMQ endpoints to bind (default tcp://127.0.0.1:5556)

    [limits]                      # any field of stream.session.EngineLimits
    beat_queue = 4
    signal_timeout_s = 3.0
    max_devices = 256
    workers = 2

    [references]                  # model only: each device's patient echo loop (core/reference_loop.py); SIGHUP rereads
    "polar-h10-1" = "loops/patient-7.mp4?frames=12:41"   # relative: to this file's folder

    [metrics]                     # present: serve /metrics and /health (stream/metrics.py)
    host = "127.0.0.1"
    port = 9108

    [log]
    level = "info"                # debug, info, warning, error
    format = "json"               # text (default) or json: one JSON object per line

Errors are :class:`ConfigError` with one line: ``FILE: [table] key: what is wrong``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
LOG_LEVELS = ("debug", "info", "warning", "error")
SOURCE_SCHEMES = ("mqtt", "mqtts", "ble", "file", "synthetic")
_BACKEND_KEYS = {
    "sim": {"size": int, "frames_per_beat": int},
    "model": {"checkpoint": str, "torch_device": str, "batching": bool, "batch_window_ms": float, "precision": str,
              "cuda_graphs": bool, "compile": bool, "warm_up_batch": int},
}


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one line naming the file and key."""


@dataclass(frozen=True)
class ServeConfig:
    """What `serve` needs, validated. `limits` are EngineLimits keyword arguments."""

    path: Path
    sources: tuple[str, ...]
    data_dir: Path
    duration_s: float | None = None
    backend: str | None = None
    backend_options: dict[str, Any] = field(default_factory=dict)  # make_backend(backend, **backend_options)
    publish: tuple[str, ...] = (DEFAULT_PUBLISH,)
    limits: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, int] | None = None  # (host, port), None: no metrics server
    log_level: str = "info"
    log_format: str = "text"


class _Table:
    """One TOML table being read: typed getters that name the table and key in errors."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        self.path, self.name = path, name
        if not isinstance(data, dict):
            self.fail("", f"must be a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data

    def fail(self, key: str, problem: str) -> None:
        where = f"[{self.name}] " if self.name else ""
        raise ConfigError(f"{self.path}: {where}{key}{': ' if key else ''}{problem}")

    def check_keys(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            self.fail(unknown[0], f"unknown key; known: {', '.join(sorted(allowed))}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML integers are fine where a float is wanted; booleans are never numbers.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("number" if k is float else k.__name__ for k in kinds)
            self.fail(key, f"must be {names}, got {type(value).__name__} {value!r}")
        return value

    def strings(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
        value = self.get(key, (list, str), default)
        if value is default:
            return default
        items = [value] if isinstance(value, str) else value
        if not items or not all(isinstance(v, str) and v.strip() for v in items):
            self.fail(key, "must be a non-empty string or list of non-empty strings")
        return tuple(items)

    def table(self, key: str) -> "_Table | None":
        return _Table(self.path, key, self.data[key]) if key in self.data else None


def _sources(top: _Table) -> tuple[str, ...]:
    sources = top.strings("sources")
    if sources is None:
        top.fail("sources", "missing; give at least one source URL, e.g. \"synthetic://?devices=2\"")
    for url in sources:
        if url.partition("://")[0] not in SOURCE_SCHEMES or "://" not in url:
            top.fail("sources", f"{url!r}: expected one of {', '.join(s + '://' for s in SOURCE_SCHEMES)}")
    return sources


def _backend(table: _Table | None) -> tuple[str | None, dict[str, Any]]:
    if table is None:
        return None, {}
    name = table.get("name", str)
    if name is not None and name not in _BACKEND_KEYS:
        table.fail("name", f"must be one of {', '.join(_BACKEND_KEYS)}, got {name!r}")
    allowed = {k: t for n, keys in _BACKEND_KEYS.items() if name in (None, n) for k, t in keys.items()}
    table.check_keys({"name", *allowed})
    options = {key: table.get(key, kind) for key, kind in allowed.items() if key in table.data}
    for key in ("size", "frames_per_beat"):
        if key in options and options[key] < 1:
            table.fail(key, f"must be >= 1, got {options[key]}")
    if options.get("precision", "fp32") not in ("fp32", "bf16"):
        table.fail("precision", f"must be \"fp32\" or \"bf16\", got {options['precision']!r}")
    if options.get("batch_window_ms", 0.0) < 0:
        table.fail("batch_window_ms", f"must be >= 0, got {options['batch_window_ms']}")
    if "torch_device" in options:
        options["device"] = options.pop("torch_device")  # ModelBackend's keyword
    return name, options


def _limits(table: _Table | None) -> dict[str, Any]:
    from .session import EngineLimits

    if table is None:
        return {}
    fields = {f.name: type(f.default) for f in dataclasses.fields(EngineLimits)}
    table.check_keys(set(fields))
    limits = {key: table.get(key, kind) for key, kind in fields.items() if key in table.data}
    try:
        EngineLimits(**limits)  # its own range checks, with its own words
    except ValueError as err:
        table.fail("", str(err))
    return limits


def _metrics(table: _Table | None) -> tuple[str, int] | None:
    if table is None:
        return None
    table.check_keys({"host", "port"})
    host, port = table.get("host", str, "127.0.0.1"), table.get("port", int, 9108)
    if not 0 <= port <= 65535:
        table.fail("port", f"must be between 0 and 65535, got {port}")
    return host, port


def _references(table: _Table | None, folder: Path) -> dict[str, str]:
    """Device id -> reference loop spec, its path made absolute against the config's folder."""
    from .protocol import ProtocolError, check_device

    if table is None:
        return {}
    references = {}
    for device in table.data:
        spec = table.get(device, str)
        try:
            check_device(device)
        except ProtocolError as err:
            table.fail(device, str(err))
        head, sep, query = spec.partition("?")
        if not head.strip():
            table.fail(device, "must name a file (video, DICOM or NumPy), optionally with ?frames=A:B")
        references[device] = str(folder / Path(head).expanduser()) + sep + query
    return references


def parse_config(data: Mapping[str, Any], path: Path) -> ServeConfig:
    """Validate an already parsed TOML document (relative data_dir and reference files:
    against `path`'s folder)."""
    top = _Table(path, "", dict(data))
    top.check_keys({"sources", "data_dir", "duration_s", "backend", "publish", "references", "limits", "metrics",
                    "log"})
    data_dir = top.get("data_dir", str)
    if not data_dir:
        top.fail("data_dir", "missing; the folder where raw ECG is kept, e.g. \"/var/lib/echopulse\"")
    duration = top.get("duration_s", float)
    if duration is not None and not duration > 0:
        top.fail("duration_s", f"must be > 0, got {duration}")
    publish_table = top.table("publish")
    publish: tuple[str, ...] = (DEFAULT_PUBLISH,)
    if publish_table is not None:
        publish_table.check_keys({"endpoints"})
        publish = publish_table.strings("endpoints", publish) or publish
    log = top.table("log")
    level, log_format = "info", "text"
    if log is not None:
        log.check_keys({"level", "format"})
        level = log.get("level", str, "info").lower()
        if level not in LOG_LEVELS:
            log.fail("level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        log_format = log.get("format", str, "text").lower()
        if log_format not in ("text", "json"):
            log.fail("format", f"must be text or json, got {log_format!r}")
    name, options = _backend(top.table("backend"))
    references = _references(top.table("references"), path.parent)
    if references:
        if name == "sim":
            top.fail("references", "only the model backend primes devices with echo loops ([backend] name = \"model\")")
        options["references"] = references
    return ServeConfig(
        path=path, sources=_sources(top), data_dir=path.parent / Path(data_dir).expanduser(), duration_s=duration,
        backend=name, backend_options=options,
        publish=publish,
        limits=_limits(top.table("limits")), metrics=_metrics(top.table("metrics")), log_level=level, log_format=log_format,
    )


def _toml_reader() -> Any:
    """The standard tomllib, or on Python 3.10 the same parser as a package (a dependency
    there); None when neither imports."""
    try:
        import tomllib
        return tomllib
    except ModuleNotFoundError:
        try:
            import tomli
            return tomli
        except ModuleNotFoundError:
            return None


def load_config(path: str | Path) -> ServeConfig:
    """Read and validate a serve config file; ConfigError (one line) if it cannot be used."""
    path = Path(path)
    toml = _toml_reader()
    if toml is None:
        raise ConfigError(f"{path}: reading TOML needs Python 3.11 or later, or the tomli package")
    try:
        with open(path, "rb") as f:
            data = toml.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: {err.strerror or err}") from None
    except toml.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError as err:  # TOML is UTF-8; tomllib decodes the bytes itself
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    return parse_config(data, path)
