"""`echopulse serve`: run the streaming engine as a daemon.

    echopulse serve --source mqtt://HOST:PORT/FILTER | mqtts://... | ble://ADDRESS[?mode=hr] |
                             file://PATH[?speed=1&device=NAME] | synthetic://?devices=N
                    --publish tcp://127.0.0.1:5556 --data-dir DIR [--backend sim|model]
                    [--reference DEVICE=ECHO_LOOP ...] [--duration S]

--source may be given several times. MQTT: user:password@ before the host, a topic
filter after it (default ecg/+; the device id is the topic's last level), query options
client_id, qos, max_payload (bytes); mqtts:// uses TLS with the system's CA store.
file:// replays a recording at real-time pace (speed=0: as fast as possible; fs and lead
options where the file does not say). synthetic:// options: devices, hr, seed, speed,
duration (s of ECG per device), prefix (device ids are PREFIX-0, PREFIX-1, ...). SIGINT/SIGTERM stop the engine cleanly: raw ECG
files flushed, a "stopped" status per device, sockets closed, exit status 0.

--reference primes a device with one cardiac cycle of its patient's echo (DICOM cine,
video or NumPy; FILE?frames=A:B picks the cycle, core/reference_loop.py); a device
without one starts from a simulated heart, whose EF is not the patient's. Frames carry
"prime": "reference" or "simulated". SIGHUP reads the references again (the config
file's [references] and --reference): a device whose loop changed takes the new one at
its next beat, its video going on from its last frame; a file that cannot be used is
logged and the loops in use stay. A device whose reference was removed goes on from its
simulated heart. References for devices that --allow-device leaves out are refused.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..logs import configure as configure_logging
from .args import CliError, positive_int, ranged

log = logging.getLogger(__name__)

SCHEMES = ("mqtt", "mqtts", "ble", "file", "synthetic")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve live ECG as echo frames over ZeroMQ",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="read every setting from this TOML file (deploy/echopulse.toml)")
    p.add_argument("--source", action="append", default=None, help="ECG source URL (repeatable)")
    p.add_argument("--publish", action="append", default=None,
                   help="ZeroMQ endpoint to bind (repeatable; default tcp://127.0.0.1:5556)")
    p.add_argument("--data-dir", default=None, help="folder where every device's raw ECG is appended")
    p.add_argument("--backend", choices=("sim", "model"), default=None,
                   help="frame backend (default: model if installed, else sim)")
    p.add_argument("--checkpoint", default=None,
                   help="generator checkpoint folder for --backend model (default: the shipped model)")
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None,
                   help="model backend: beats of all devices ready within --batch-window-ms share one generator "
                        "call (default: on with CUDA, off on CPU)")
    p.add_argument("--batch-window-ms", type=ranged(float, 0.0, 1000.0, "batch-window-ms"), default=None,
                   help="model + batching: longest a beat waits for company (default 4)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="model + batching: fp32, or bf16 autocast (checked against fp32 in benchmarks)")
    p.add_argument("--reference", action="append", default=None, metavar="DEVICE=FILE",
                   help="model backend: prime DEVICE with one cardiac cycle of its patient's echo (video, DICOM, "
                        "NumPy; FILE?frames=A:B picks the cycle; repeatable). Devices without one start from a "
                        "simulated heart, whose EF is not the patient's")
    p.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve /metrics (Prometheus text) and /health on this address (default: off)")
    p.add_argument("--duration", type=ranged(float, 0.001, 1e9, "duration"), default=None,
                   help="stop after S seconds (default: run until stopped)")
    # limits default to None: given, they win over a config file's [limits]; else EngineLimits' defaults
    p.add_argument("--beat-queue", type=positive_int("beat-queue"), default=None,
                   help="beats waiting per device before the oldest is dropped (default 4)")
    p.add_argument("--signal-timeout", type=ranged(float, 0.01, 3600.0, "signal-timeout"), default=None,
                   help="seconds without ECG before a device's signal counts as lost (default 3)")
    p.add_argument("--workers", type=positive_int("workers"), default=None, help="backend threads (default 2)")
    p.add_argument("--allow-device", action="append", default=None, metavar="ID",
                   help="serve only these device ids (repeatable; default: any, up to --max-devices)")
    p.add_argument("--max-devices", type=positive_int("max-devices"), default=None,
                   help="devices served at most; more are refused with a status (default 256)")
    p.set_defaults(handler=handle)


def _query(url: str) -> tuple[str, dict[str, str]]:
    """Split 'head?query' by hand: an MQTT filter may hold '#', which urlsplit takes for a fragment."""
    head, _, query = url.partition("?")
    return head, {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _number(options: dict[str, str], key: str, kind: type, default: Any, url: str) -> Any:
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError:
        raise CliError(f"{url}: option {key}={options[key]!r} is not a valid {kind.__name__}") from None


def make_source(url: str) -> Any:
    """Build the bridge for one --source URL; CliError with one line when it cannot be."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise CliError(f"--source {url!r}: expected one of {', '.join(s + '://' for s in SCHEMES)}")
    head, options = _query(rest)
    if scheme in ("mqtt", "mqtts"):
        return _mqtt_source(url, scheme, head, options)
    if scheme == "file":
        return _file_source(url, head, options)
    if scheme == "ble":
        if not head:
            raise CliError(f"--source {url!r}: ble:// needs a device address")
        ble = _bridge("ble", url)
        mode = options.get("mode", "ecg")
        if mode not in ("ecg", "hr"):
            raise CliError(f"--source {url!r}: mode must be ecg (Polar H10 PMD) or hr (Heart Rate service, RR only)")
        # hr: any strap or watch with the standard Heart Rate service; the engine then makes
        # beats from the RR intervals alone.
        return (ble.HeartRateSource if mode == "hr" else ble.PolarH10Source)(unquote(head))
    synthetic = _bridge("synthetic", url)
    kwargs = {
        "devices": _number(options, "devices", int, 1, url),
        "hr": _number(options, "hr", float, 75.0, url),
        "seed": _number(options, "seed", int, 0, url),
        "realtime": _number(options, "speed", float, 1.0, url),
        "duration_s": _number(options, "duration", float, None, url),
        "prefix": options.get("prefix") or "sim",
        "pacing": options.get("pacing") or "none",
    }
    try:
        return synthetic.SyntheticSource(**kwargs)
    except ValueError as err:
        raise CliError(f"--source {url!r}: {err}") from None


def _bridge(name: str, url: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"echopulse.bridges.{name}")
    except ImportError as err:
        raise CliError(f"--source {url!r}: the {name} bridge is not available: {err}") from None


def _mqtt_source(url: str, scheme: str, head: str, options: dict[str, str]) -> Any:
    from ...bridges.mqtt import MqttSource

    netloc, _, topic_filter = head.partition("/")
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port or (8883 if scheme == "mqtts" else 1883)
    except ValueError:
        raise CliError(f"--source {url!r}: bad port") from None
    if not parts.hostname:
        raise CliError(f"--source {url!r}: no broker host")
    tls = None
    if scheme == "mqtts":
        import ssl

        tls = ssl.create_default_context()
    return MqttSource(
        parts.hostname, port, unquote(topic_filter) or "ecg/+",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls, client_id=options.get("client_id") or None,
        qos=_number(options, "qos", int, 1, url), max_payload=_number(options, "max_payload", int, 262144, url),
    )


def _file_source(url: str, head: str, options: dict[str, str]) -> Any:
    from ...bridges.replay import FileSource

    path = Path(unquote(head))
    if not path.exists() and not path.with_name(path.name + ".hea").exists():
        raise CliError(f"--source {url!r}: no such file {path}")
    lead = options.get("lead")
    return FileSource(
        path, fs=_number(options, "fs", float, None, url), lead=int(lead) if lead and lead.isdigit() else lead,
        device=options.get("device") or path.stem, realtime=_number(options, "speed", float, 1.0, url),
    )


def parse_references(items: list[str] | None) -> dict[str, str]:
    """--reference DEVICE=FILE items -> {device: file spec}; CliError for a malformed one."""
    references: dict[str, str] = {}
    for item in items or ():
        device, sep, spec = item.partition("=")
        if not sep or not device or not spec:
            raise CliError(f"--reference {item!r}: expected DEVICE=FILE, e.g. polar-1=patient.mp4")
        if device in references:
            raise CliError(f"--reference: {device} given twice ({references[device]}, {spec})")
        references[device] = spec
    return references


def _metrics_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9108")
    return host or "127.0.0.1", int(port)


def apply_config(args: argparse.Namespace) -> Any:
    """Fill `args` from --config FILE.toml where the command line left them out (a flag
    given wins over the file); return the ServeConfig (its limits and metrics are used by serve)."""
    from ..config_file import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as err:
        raise CliError(str(err)) from None
    args.source = args.source or list(config.sources)
    args.data_dir = args.data_dir or str(config.data_dir)
    args.publish = args.publish or list(config.publish)
    args.backend = args.backend or config.backend
    args.duration = args.duration if args.duration is not None else config.duration_s
    level = logging.WARNING - 10 * min(args.verbose, 2) if getattr(args, "verbose", 0) else config.log_level
    configure_logging(level, getattr(args, "log_format", None) or config.log_format)
    return config


def engine_limits(args: argparse.Namespace, config: Any = None) -> Any:
    """The config file's [limits], with the limits given on the command line on top."""
    from ..session import EngineLimits

    given = {"beat_queue": args.beat_queue, "signal_timeout_s": args.signal_timeout, "workers": args.workers,
             "max_devices": args.max_devices}
    base = dict(config.limits) if config is not None else {}
    return EngineLimits(**{**base, **{key: value for key, value in given.items() if value is not None}})


async def serve(args: argparse.Namespace, sources: list[Any], backend: Any, config: Any = None) -> dict:
    from ..engine import Engine
    from ..metrics import MetricsServer
    from ..publish import Publisher

    from ...bridges.recording import ReplayError

    for source in sources:  # a file that cannot be read is a usage error, not a stream event
        if hasattr(source, "load"):
            try:
                await source.load()
            except ReplayError as err:
                raise CliError(str(err)) from None
    try:
        publisher = Publisher(args.publish or ["tcp://127.0.0.1:5556"], last_value_cache=True)
    except OSError as err:
        raise CliError(str(err)) from None
    try:
        limits = engine_limits(args, config)
        engine = Engine(sources, backend, publisher, args.data_dir, limits=limits, devices=args.allow_device)
        address = _metrics_address(args.metrics) if args.metrics else (config.metrics if config is not None else None)
        metrics = MetricsServer(engine.counters, *address, primes_fn=engine.primes) if address else None
        if metrics is not None:
            try:
                await metrics.start()
            except OSError as err:
                raise CliError(f"metrics: cannot listen on {metrics.host}:{metrics.port}: {err}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, engine.stop)
        reloads: set[asyncio.Task] = set()

        def reload() -> None:  # SIGHUP: the references again, from the config file and --reference
            task = loop.create_task(reload_references(args, backend))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        log.info("serving on %s, raw ECG in %s, backend %s", ", ".join(publisher.endpoints), args.data_dir, backend.name)
        try:
            await engine.run(duration=args.duration)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if metrics is not None:
                await metrics.close()
        return engine.counters()
    finally:
        publisher.close()


def check_references_allowed(references: dict[str, str], allowed: list[str] | None) -> None:
    """CliError naming the devices given a loop that the --allow-device list would never serve."""
    refused = [] if allowed is None else sorted(set(references) - set(allowed))
    if refused:
        raise CliError(f"reference loops for {', '.join(refused)}, which --allow-device does not serve")


def current_references(args: argparse.Namespace) -> dict[str, str]:
    """The references as the command line and config file say now: the file's [references]
    table, then --reference on top. ConfigError/CliError when either cannot be read."""
    from ..config_file import load_config

    from_file = dict(load_config(args.config).backend_options.get("references", {})) if args.config else {}
    return {**from_file, **parse_references(args.reference)}


async def reload_references(args: argparse.Namespace, backend: Any) -> list[str] | None:
    """Read the references again and give them to the backend; a problem is logged and the
    loops in use stay. Returns the devices whose loop changed (None when nothing changed)."""
    from ..config_file import ConfigError

    try:
        specs = current_references(args)
        check_references_allowed(specs, getattr(args, "allow_device", None))
        changed = await asyncio.to_thread(backend.set_references, specs)
    except (ConfigError, CliError, ValueError) as err:
        log.error("references not reloaded, the loops in use stay: %s", err)
        return None
    log.info("references reloaded: %d loop(s); changed for %s", len(specs), ", ".join(changed) or "no device")
    return changed


def handle(args: argparse.Namespace) -> int:
    from .. import backends

    config = apply_config(args) if args.config else None
    if not args.source or not args.data_dir:
        raise CliError("give --source and --data-dir, or --config FILE.toml")
    sources = [make_source(url) for url in args.source]
    data_dir = Path(args.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"--data-dir {data_dir}: {err}") from None
    try:
        options = dict(config.backend_options) if config is not None else {}
        options.setdefault("checkpoint", args.checkpoint)
        for key in ("batching", "batch_window_ms", "precision"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
        references = {**options.get("references", {}), **parse_references(args.reference)}
        check_references_allowed(references, args.allow_device)
        if references:
            options["references"] = references
        backend = backends.make_backend(args.backend, **options)
    except (ValueError, RuntimeError, OSError) as err:
        raise CliError(str(err)) from None
    counters = asyncio.run(serve(args, sources, backend, config))
    for device, values in sorted(counters.items()):
        if values:
            log.info("%s: %s", device, ", ".join(f"{k}={v}" for k, v in sorted(values.items())))
    return 0
