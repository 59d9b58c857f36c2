"""The package installs as DESIGN §2 says: every source folder importable as echopulse.*,
the console script answers, and bad command lines exit 2 with one line."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"core": "echopulse.core", "kernels": "echopulse.kernels", "stream": "echopulse.stream", "bridges": "echopulse.bridges"}


def declared_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(config["tool"]["setuptools"]["packages"])


def source_packages() -> set[str]:
    found = set()
    for folder, name in TOP_LEVEL.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_source_package_is_declared() -> None:
    # A folder missing from pyproject imports in an editable install but not in a wheel.
    assert source_packages() == declared_packages()


@pytest.mark.parametrize("name", sorted(TOP_LEVEL.values()))
def test_top_level_imports(name: str) -> None:
    __import__(name)


def test_console_script_help() -> None:
    out = subprocess.run(["echopulse", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "simulate" in out.stdout


def test_unknown_command_is_one_line_exit_2() -> None:
    out = subprocess.run([sys.executable, "-m", "echopulse.stream.cli", "no-such-command"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "invalid choice" in out.stderr


def test_cli_help_does_not_import_torch() -> None:
    # `echopulse --help` must answer at once: command registration stays free of heavy imports.
    code = "import sys; from echopulse.stream.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_public_api_names_of_design() -> None:
    # DESIGN §1: one Python API, echopulse.core.Generator and echopulse.stream.Engine.
    import echopulse.core
    import echopulse.stream

    assert echopulse.stream.Engine.__name__ == "Engine"
    assert echopulse.core.Generator.__name__ == "Generator"
    with pytest.raises(AttributeError):
        echopulse.stream.NoSuchThing  # noqa: B018
