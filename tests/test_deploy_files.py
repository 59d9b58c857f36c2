"""deploy/: the image and the unit give the daemon what it writes (numba's kernel cache
included), the unit installs the CPU torch and stops a crash loop, its hardening leaves
JIT, CUDA and D-Bus working, and every key the example config shows, commented ones
included, is one the real loader accepts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package (a dependency there)
    import tomli as tomllib

from echopulse.stream.config_file import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _unit() -> dict[str, list[str]]:
    """The unit's `Key=value` lines, values per key in order (comments left out)."""
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "echopulse.service").read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def _dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def _docker_env(text: str) -> dict[str, str]:
    """ENV settings of the Dockerfile (KEY=VALUE form, continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(part.split("=", 1) for part in line[4:].split() if "=" in part)
    return env


def test_image_gives_numba_a_cache_its_user_can_write() -> None:
    text = _dockerfile()
    cache = _docker_env(text).get("NUMBA_CACHE_DIR")
    assert cache, "numba cannot import the kernels where the package folder and the home are read-only"
    created = [line for line in text.splitlines() if "install -d" in line and "-o echopulse" in line]
    parent = str(Path(cache).parent)
    assert any(cache in line or parent in line.split() for line in created), created
    user = text.index("USER echopulse")
    warm = text.index("Session.warm_up()")
    assert warm > user  # compiled as the service user, into that cache


def test_image_config_is_not_writable_by_the_service() -> None:
    created = " ".join(line for line in _dockerfile().splitlines() if "install -d" in line)
    assert "/etc/echopulse" not in created  # the daemon has no business rewriting its config


def test_unit_gives_numba_a_cache_inside_its_cache_directory() -> None:
    unit = _unit()
    env = dict(item.split("=", 1) for value in unit.get("Environment", []) for item in value.split())
    assert "NUMBA_CACHE_DIR" in env, "ProtectSystem=strict and no home: numba has nowhere to cache"
    writable = [f"/var/cache/{d}" for d in unit.get("CacheDirectory", [])] + \
               [f"/var/lib/{d}" for d in unit.get("StateDirectory", [])]
    assert any(env["NUMBA_CACHE_DIR"].startswith(w + "/") for w in writable), (env, writable)


def test_unit_data_dir_is_its_state_directory() -> None:
    config = load_config(DEPLOY / "echopulse.toml")
    assert str(config.data_dir) in [f"/var/lib/{d}" for d in _unit()["StateDirectory"]]


def test_unit_install_steps_take_torch_from_the_cpu_index() -> None:
    lines = [line for line in (DEPLOY / "echopulse.service").read_text().splitlines() if "torch==" in line]
    assert lines and all("download.pytorch.org/whl/cpu" in line for line in lines), lines


def test_unit_stops_restarting_a_daemon_that_keeps_failing() -> None:
    unit = _unit()
    interval = float(unit.get("StartLimitIntervalSec", ["10"])[-1])  # systemd's defaults
    burst = int(unit.get("StartLimitBurst", ["5"])[-1])
    restart_sec = float(unit["RestartSec"][-1])
    # the limit trips only if `burst` restarts fit in the interval
    assert burst * restart_sec < interval


def test_unit_hardening_leaves_jit_cuda_and_dbus_working() -> None:
    unit = _unit()
    for key in ("MemoryDenyWriteExecute", "PrivateDevices", "DeviceAllow", "ProtectClock", "RestrictAddressFamilies",
                "PrivateNetwork", "DynamicUser"):
        assert key not in unit, key
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]


def _setting(line: str) -> str | None:
    """The TOML a commented-out setting holds (`# key = value`, `# [table]`); None for prose."""
    body = line.lstrip("#").strip() if line.startswith("#") else ""
    try:
        tomllib.loads(body)
    except tomllib.TOMLDecodeError:
        return None
    return body or None


def _model_variant() -> str:
    """deploy/echopulse.toml switched to the model backend as its comments say: every
    commented setting switched on, the sim-only ones deleted."""
    out = []
    for line in (DEPLOY / "echopulse.toml").read_text().splitlines():
        setting = _setting(line)
        if setting is None and "sim only" in line:
            continue
        out.append((setting or line).replace('name = "sim"', 'name = "model"'))
    return "\n".join(out) + "\n"


def test_every_commented_model_setting_in_the_example_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "model.toml"
    path.write_text(_model_variant())
    config = load_config(path)
    assert config.backend == "model"
    shown = {"checkpoint", "device", "batching", "batch_window_ms", "precision", "compile", "warm_up_batch", "references"}
    assert shown <= set(config.backend_options), sorted(config.backend_options)
    assert len(config.backend_options["references"]) == 2


@pytest.mark.parametrize("name", ["echopulse.toml", "docker.toml"])
def test_example_configs_parse_with_the_real_loader(name: str) -> None:
    config = load_config(DEPLOY / name)
    assert config.sources and config.metrics is not None
