"""Run every stage benchmark, print one table, write one JSON with the machine it ran on.

Each `benchmarks/bench_<stage>.py` exposes ``run(quick: bool) -> dict`` returning
``{"rows": [{"metric": str, "value": float, "unit": str, "target": str | None}], ...}``
(and optionally ``"skipped": [str]``: parts not measured here, and why)
plus any raw figures it wants kept. `--quick` sizes every stage for CI.

    python benchmarks/run.py [--quick] [--only simulate,beats] [--out results.json] [--gpu-only]

`--gpu-only` runs only the GPU parts of the stages that have one (a stage opts in by
taking ``run(quick, gpu_only)``): on a lent GPU box the CPU rows would describe that
box's CPU, not the machines the CPU figures are reported for, and cost device time.
The JSON is rewritten after every stage, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


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
    for name in ("numpy", "numba", "torch", "zmq", "sleepecg", "neurokit2"):
        try:
            info[f"{name}_version"] = importlib.import_module(name).__version__
        except Exception:  # a missing peer is reported, not fatal
            info[f"{name}_version"] = None
    # which code was measured: ECHOPULSE_COMMIT when set (a copy of the tree on a lent GPU box
    # has no .git, or a stale one), else git's HEAD
    info["commit"] = os.environ.get("ECHOPULSE_COMMIT") or None
    if info["commit"] is None:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                            text=True, timeout=10, check=True).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["gpu"] = None
    return info


def stages() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


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

    sys.path.insert(0, str(HERE))  # stage modules import each other's helpers by name
    results = {"machine": machine_info(), "quick": args.quick, "gpu_only": args.gpu_only,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'stage':<12} {'metric':<58} {'value':>14}  {'unit':<10} target", flush=True)
    for stage in wanted:
        module = importlib.import_module(f"bench_{stage}")
        logging.getLogger(module.__name__).setLevel(logging.INFO)
        options = {"quick": args.quick}
        if args.gpu_only:
            if "gpu_only" not in inspect.signature(module.run).parameters:
                print(f"{stage:<12} (no GPU part: skipped with --gpu-only)", flush=True)
                continue
            options["gpu_only"] = True
        t0 = time.perf_counter()
        result = module.run(**options)
        result["wall_s"] = time.perf_counter() - t0
        results["stages"][stage] = result
        for row in result["rows"]:
            print(f"{stage:<12} {row['metric']:<58} {row['value']:>14.4g}  {row['unit']:<10} {row.get('target') or ''}", flush=True)
        for note in result.get("skipped", ()):
            print(f"{stage:<12} (skipped: {note})", flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
