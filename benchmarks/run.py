"""Run every stage benchmark, print one table, write one JSON with the machine it ran on.

Each `benchmarks/bench_<stage>.py` exposes ``run(quick: bool) -> dict`` returning
``{"rows": [{"metric": str, "value": float, "unit": str, "target": str | None}], ...}``
plus any raw figures it wants kept. `--quick` sizes every stage for CI.

    python benchmarks/run.py [--quick] [--only simulate,beats] [--out results.json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
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
    args = parser.parse_args(argv)

    wanted = [s for s in args.only.split(",") if s] or stages()
    unknown = sorted(set(wanted) - set(stages()))
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}; known: {', '.join(stages())}")

    sys.path.insert(0, str(HERE))  # stage modules import each other's helpers by name
    results = {"machine": machine_info(), "quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}
    print(f"{'stage':<12} {'metric':<58} {'value':>14}  {'unit':<10} target")
    for stage in wanted:
        module = importlib.import_module(f"bench_{stage}")
        t0 = time.perf_counter()
        result = module.run(quick=args.quick)
        result["wall_s"] = time.perf_counter() - t0
        results["stages"][stage] = result
        for row in result["rows"]:
            print(f"{stage:<12} {row['metric']:<58} {row['value']:>14.4g}  {row['unit']:<10} {row.get('target') or ''}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
