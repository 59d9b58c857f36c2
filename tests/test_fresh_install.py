"""The README's first command, as written, in a fresh virtual environment (issue 8).

A new venv (no system site-packages), a copy of the source tree as the working directory,
and the README's set-up line (`pip install torch==… && pip install -e . && echopulse demo`,
read from README.md, not repeated here) run by bash with the venv first on PATH. Then the
files the demo promises: echopulse-demo/demo.mp4 (frames), contact_sheet.png, lv_area.png,
summary.json with beats. Slow: pip installs torch (a local wheel here) and the
dependencies (pip's cache) into the venv.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from test_readme import ROOT, setup_commands

# What `pip install -e .` needs from a checkout (a fresh clone has these; runs/, build
# output and caches of this working tree stay behind).
SOURCE = ("pyproject.toml", "README.md", "core", "kernels", "stream", "bridges")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache")
COMMAND_TIMEOUT_S = 900


def _copy_source(dest: Path) -> None:
    dest.mkdir()
    for name in SOURCE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORE)
        else:
            shutil.copy2(src, dest / name)
    for licence in ROOT.glob("LICEN[CS]E*"):
        shutil.copy2(licence, dest / licence.name)


def _system_install_state() -> dict[str, float]:
    """This interpreter's site-packages entries for echopulse and torch, with mtimes."""
    state = {}
    for key in ("purelib", "platlib"):
        folder = Path(sysconfig.get_paths()[key])
        for entry in folder.glob("*"):
            if "echopulse" in entry.name.lower() or entry.name.lower().startswith("torch"):
                state[str(entry)] = entry.stat().st_mtime
    return state


def _venv_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "PIP_USER", "PIP_TARGET", "PIP_PREFIX",
                        "PIP_REQUIRE_VIRTUALENV", "CONDA_PREFIX", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)  # what `source venv/bin/activate` sets
    env["PIP_REQUIRE_VIRTUALENV"] = "1"  # a pip from outside the venv would refuse, not install globally
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(COMMAND_TIMEOUT_S + 300)
def test_readme_first_command_in_a_fresh_venv(tmp_path: Path) -> None:
    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("ensurepip") is None:
        pytest.skip("python -m venv is unavailable here (no venv/ensurepip module; Debian: apt-get install python3-venv)")
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0 and "ensurepip" in made.stdout + made.stderr:
        pytest.skip(f"python -m venv cannot make a venv with pip here: {made.stdout.strip()[-300:]}")
    assert made.returncode == 0, made.stderr
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()

    work = tmp_path / "checkout"
    _copy_source(work)
    command = setup_commands()[0]
    before = _system_install_state()
    started = time.monotonic()
    try:
        ran = subprocess.run(["bash", "-c", f"set -e\n{command}"], cwd=work, env=_venv_env(venv),
                             capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        pytest.fail(f"README command did not finish in {COMMAND_TIMEOUT_S} s: {command}\n{tail!r}")
    took = time.monotonic() - started
    assert ran.returncode == 0, f"README command failed ({took:.0f} s): {command}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"

    # Everything went into the venv, nothing into this interpreter's site-packages.
    assert _system_install_state() == before
    probe = ("import json, sys, torch, echopulse.stream as s; "
             "print(json.dumps({'prefix': sys.prefix, 'torch': torch.__file__, 'version': torch.__version__, "
             "'echopulse': list(s.__path__)}))")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=120,
                           cwd=tmp_path, env=_venv_env(venv))
    assert where.returncode == 0, where.stderr
    info = json.loads(where.stdout)
    assert Path(info["prefix"]).resolve() == venv.resolve()
    assert Path(info["torch"]).resolve().is_relative_to(venv.resolve())
    pin = next(a for a in command.split() if a.startswith("torch=="))
    assert info["version"].split("+")[0] == pin.removeprefix("torch==")
    assert [Path(p).resolve() for p in info["echopulse"]] == [(work / "stream").resolve()]

    # The files the README promises.
    folder = work / "echopulse-demo"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["beats"] > 0 and summary["frames"] > 0, summary

    import imageio.v2 as imageio

    reader = imageio.get_reader(folder / "demo.mp4")
    try:
        frames = [frame for _, frame in zip(range(20), reader)]
    finally:
        reader.close()
    assert len(frames) == 20 and frames[0].ndim == 3 and frames[0].shape[0] > 256

    from PIL import Image

    for name in ("contact_sheet.png", "lv_area.png"):
        with Image.open(folder / name) as img:
            img.load()
            assert img.width > 200 and img.height > 100, name
    print(f"README first command in a fresh venv: {took:.0f} s")
