"""Run every stage benchmark, print one table, write one JSON with the machine it ran on.

Each `benchmarks/bench_<stage>.py` exposes ``run(quick: bool) -> dict`` returning
``{"rows": [{"metric": str, "value": float, "unit": str, "target": str | None}], ...}``
(and optionally ``"skipped": [str]``: parts not measured here, and why)
plus any raw figures it wants kept. `--quick` sizes every stage for CI.

    python benchmarks/run.py [--quick] [--only simulate,beats] [--out results.json] [--gpu-only]

`--gpu-only` runs only the GPU parts of the stages that have one (a stage opts in by
taking ``run(quick, gpu_only)``): on a lent GPU box the CPU rows would describe that
box's CPU, not the machines the CPU figures are reported for, and cost device time.
Without a CUDA device it stops at once (status 2): there would be nothing to measure.

The JSON is rewritten after every stage, and during a stage that takes ``progress`` (a
callable handed the stage's result so far, marked ``"partial": true``), so a run cut short
keeps what it measured. A stage that raises is recorded with its error and the others
still run; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the code a result depends on: the package's folders and the benchmarks themselves
SOURCE_FOLDERS = ("core", "kernels", "stream", "bridges", "benchmarks")


def source_sha256(root: Path = ROOT, folders: tuple[str, ...] = SOURCE_FOLDERS) -> str:
    """A digest of every .py file under `folders` (paths and contents): which code was measured,
    even where the commit is unknown, stale, or has uncommitted changes on top."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def commit_info() -> dict:
    """Which commit was measured: ECHOPULSE_COMMIT when set (a copy of the tree on a lent GPU
    box has no .git, or a stale one), else git's HEAD, with whether tracked files differ from it."""
    given = os.environ.get("ECHOPULSE_COMMIT")
    if given:
        return {"commit": given, "commit_source": "ECHOPULSE_COMMIT"}
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return {"commit": None, "commit_source": None}
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head, "commit_source": "git", "tree_dirty": None if changes is None else bool(changes)}


def gpu_info() -> dict:
    """The GPU and the CUDA software under torch (None where absent): what a GPU figure depends on."""
    info: dict = {"gpu": None}
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                        gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_multiprocessors=props.multi_processor_count,
                        cudnn_version=torch.backends.cudnn.version(), gpu_driver=_driver_version())
    except Exception as err:  # a broken CUDA set-up is reported, not fatal
        info["gpu_error"] = repr(err)
    return info


def _driver_version() -> str | None:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = smi.stdout.strip().splitlines()
    return lines[0] if smi.returncode == 0 and lines else None


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for name in ("numpy", "numba", "torch", "zmq", "sleepecg", "neurokit2", "cupy"):
        try:
            info[f"{name}_version"] = importlib.import_module(name).__version__
        except Exception:  # a missing peer is reported, not fatal
            info[f"{name}_version"] = None
    info.update(commit_info())
    info["source_sha256"] = source_sha256()
    info.update(gpu_info())
    return info


def stages() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _takes(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _has_gpu_part(stage: str) -> bool:
    try:
        return _takes(importlib.import_module(f"bench_{stage}").run, "gpu_only")
    except Exception:
        return True  # `run_stage` imports it again and records why it cannot


def _print_rows(stage: str, result: dict) -> None:
    for row in result["rows"]:
        print(f"{stage:<12} {row['metric']:<58} {row['value']:>14.4g}  {row['unit']:<10} {row.get('target') or ''}", flush=True)
    for note in result.get("skipped", ()):
        print(f"{stage:<12} (skipped: {note})", flush=True)


def run_stage(stage: str, options: dict, save: Callable[[dict], None]) -> dict:
    """One stage's result; an exception becomes the result (error and traceback), not the end
    of the run: a lent GPU's minutes must not be lost to one stage. `save` writes a partial one."""
    t0 = time.perf_counter()
    last: dict = {"rows": []}  # the latest partial result: kept if the stage then fails

    def partial(result: dict) -> None:
        last.clear()
        last.update(result, partial=True)
        save(last)

    try:
        module = importlib.import_module(f"bench_{stage}")
        logging.getLogger(module.__name__).setLevel(logging.INFO)
        if _takes(module.run, "progress"):
            options = {**options, "progress": partial}
        result = module.run(**options)
    except Exception as err:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        result = {**last, "error": repr(err), "traceback": trace}
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized runs")
    parser.add_argument("--only", default="", help="comma-separated stages (default: all)")
    parser.add_argument("--out", default=str(HERE / "results" / "latest.json"), help="JSON output path")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU parts of the stages that have one")
    args = parser.parse_args(argv)
    # the stages' progress and failed sections go to stderr (the engine's own INFO lines,
    # a line per simulated device, would drown them); the table goes to stdout
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    wanted = [s for s in args.only.split(",") if s] or stages()
    unknown = sorted(set(wanted) - set(stages()))
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}; known: {', '.join(stages())}")
    if args.gpu_only and not cuda_available():
        import torch

        print(f"run.py: --gpu-only needs a CUDA device, and torch {torch.__version__} sees none: nothing to measure "
              "(run benchmarks/gpu.sh on a GPU box)", file=sys.stderr)
        return 2

    sys.path.insert(0, str(HERE))  # stage modules import each other's helpers by name
    results = {"machine": machine_info(), "quick": args.quick, "gpu_only": args.gpu_only,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(stage: str, result: dict) -> None:
        results["stages"][stage] = result
        out.write_text(json.dumps(results, indent=2) + "\n")

    failed = []
    print(f"{'stage':<12} {'metric':<58} {'value':>14}  {'unit':<10} target", flush=True)
    for stage in wanted:
        options = {"quick": args.quick}
        if args.gpu_only:
            if not _has_gpu_part(stage):
                print(f"{stage:<12} (no GPU part: skipped with --gpu-only)", flush=True)
                continue
            options["gpu_only"] = True
        result = run_stage(stage, options, lambda partial, stage=stage: save(stage, partial))
        _print_rows(stage, result)
        if "error" in result:
            failed.append(stage)
            print(f"{stage:<12} FAILED: {result['error'][:200]}", flush=True)
        save(stage, result)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
