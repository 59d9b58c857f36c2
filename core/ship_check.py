"""Whether retrained tiny weights may replace the shipped ones: both scored side by side,
and a verdict with the reason of every check.

    python -m echopulse.core.ship_check --tokenizer runs/retrain/tokenizer-eval.json \
        --generator runs/retrain/generator-eval.json --out runs/retrain/verdict.json

The candidate's JSON files are `echopulse evaluate tokenizer` / `evaluate generator`
reports on the held-out seeds of the shipped figures; the shipped ones default to
`benchmarks/results/tokenizer-eval-tiny.json` and `docs/generator-eval-tiny.json`.

Both candidates must be scored on the shipped figures' seeds (same clips, same subjects),
the generator with the same leads and segmenter.
The rules: the tokenizer must be better in SSIM and no worse in MSE (a new encoder changes
every token, which is only worth a better tokenizer). The generator must keep the issue's
targets in both primings (SSIM >= 0.60, ED and ES within one frame on >= 90 % of beats)
and not lose EF accuracy or heart-rate tracking beyond the noise of 100 subjects. A
session-9 CPU retrain improved loop priming while one-frame priming fell to 86 % ED:
a check of the loop alone would have shipped it.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TOKENIZER = ROOT / "benchmarks" / "results" / "tokenizer-eval-tiny.json"
SHIPPED_GENERATOR = ROOT / "docs" / "generator-eval-tiny.json"

MSE_SLACK = 1.02          # a tokenizer no worse in MSE than 2 % (its run-to-run spread)
EF_MAE_SLACK = {"image": 0.5, "loop": 0.3}  # points: about one standard error of the MAE at n = 100
HR_SLACK = 0.10           # two of the 20 rate-jump subjects
SHARE_EPS = 1e-9          # shares are k/n: 0.55 - 0.10 lies above 9/20 in floating point
SSIM_TARGET = 0.60        # the generator targets
TIMING_TARGET = 0.90
MODES = {"image": "one frame", "loop": "reference loop"}


@dataclass(frozen=True)
class Check:
    name: str
    candidate: float
    shipped: float | None
    rule: str
    passed: bool


def _get(report: dict, path: str) -> float:
    value: Any = report
    for key in path.split("/"):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"no {path} in the report")
        value = value[key]
    return float(value)


def _subject_seeds(report: dict) -> list[int]:
    if not isinstance(report.get("subjects"), list):
        raise KeyError("no subjects in the report")
    return [int(s["seed"]) for s in report["subjects"]]


def _clips(report: dict) -> tuple[float, float, str]:
    return _get(report, "seed"), _get(report, "clips"), str(report.get("data", "simulator"))


def _measurement(report: dict) -> tuple[int, str]:
    """How a generator report measured: the ECG leads given and the segmenter that read the EF."""
    return int(report.get("leads", 1)), str(report.get("segmenter", "shipped"))


def tokenizer_checks(candidate: dict, shipped: dict) -> list[Check]:
    ssim, mse = _get(candidate, "ssim"), _get(candidate, "mse")
    ssim0, mse0 = _get(shipped, "ssim"), _get(shipped, "mse")
    # figures from other clips (another --seed, a shorter --n) say nothing against these
    same = _clips(candidate) == _clips(shipped)
    return [
        Check("tokenizer: the shipped clips", _get(candidate, "clips"), _get(shipped, "clips"),
              "same seeds and data as shipped", same),
        Check("tokenizer SSIM", ssim, ssim0, "> shipped", ssim > ssim0),
        Check("tokenizer MSE", mse, mse0, f"<= shipped x {MSE_SLACK}", mse <= mse0 * MSE_SLACK),
    ]


def generator_checks(candidate: dict, shipped: dict) -> list[Check]:
    seeds, seeds0 = _subject_seeds(candidate), _subject_seeds(shipped)
    (leads, segmenter), (leads0, segmenter0) = _measurement(candidate), _measurement(shipped)
    checks = [Check("generator: the shipped subjects", float(len(seeds)), float(len(seeds0)), "same seeds as shipped",
                    seeds == seeds0),
              # another segmenter is another ruler for EF, other leads another input
              Check("generator: the shipped measurement", float(leads), float(leads0),
                    f"same leads and segmenter ({segmenter0}) as shipped", (leads, segmenter) == (leads0, segmenter0))]
    for mode, words in MODES.items():
        base = f"summary/{mode}"
        ssim = _get(candidate, f"{base}/ssim")
        checks.append(Check(f"{words}: SSIM", ssim, _get(shipped, f"{base}/ssim"), f">= {SSIM_TARGET}",
                            ssim >= SSIM_TARGET))
        mae, mae0 = _get(candidate, f"{base}/ef_vs_true_video/mae"), _get(shipped, f"{base}/ef_vs_true_video/mae")
        slack = EF_MAE_SLACK[mode]
        checks.append(Check(f"{words}: EF MAE", mae, mae0, f"<= shipped + {slack}", mae <= mae0 + slack))
        for event in ("ed", "es"):
            share = _get(candidate, f"{base}/{event}_within_1_frame")
            checks.append(Check(f"{words}: {event.upper()} within 1 frame", share,
                                _get(shipped, f"{base}/{event}_within_1_frame"), f">= {TIMING_TARGET}",
                                share >= TIMING_TARGET))
    hr, hr0 = (_get(r, "summary/hr_tracking/follows_within_one_beat") for r in (candidate, shipped))
    checks.append(Check("HR jump followed within one beat", hr, hr0, f">= shipped - {HR_SLACK}",
                        hr >= hr0 - HR_SLACK - SHARE_EPS))
    return checks


def verdict(candidate_tokenizer: dict, candidate_generator: dict, shipped_tokenizer: dict,
            shipped_generator: dict) -> dict[str, Any]:
    """{"ship": bool, "failed": [names], "checks": [...]}; KeyError when a report lacks a figure."""
    checks = tokenizer_checks(candidate_tokenizer, shipped_tokenizer) + generator_checks(candidate_generator,
                                                                                         shipped_generator)
    failed = [c.name for c in checks if not c.passed]
    return {"ship": not failed, "failed": failed, "checks": [asdict(c) for c in checks]}


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'check':<36} {'candidate':>10} {'shipped':>10}  rule"]
    for c in result["checks"]:
        shipped = "" if c["shipped"] is None else f"{c['shipped']:.4g}"
        mark = "ok" if c["passed"] else "FAILS"
        lines.append(f"{c['name']:<36} {c['candidate']:>10.4g} {shipped:>10}  {c['rule']}  {mark}")
    lines.append("verdict: " + ("ship it" if result["ship"] else "keep the shipped weights (fails: "
                                + ", ".join(result["failed"]) + ")"))
    return "\n".join(lines)


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"ship_check: {path}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m echopulse.core.ship_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", type=Path, required=True, help="the candidate's `evaluate tokenizer` JSON")
    p.add_argument("--generator", type=Path, required=True, help="the candidate's `evaluate generator` JSON")
    p.add_argument("--shipped-tokenizer", type=Path, default=SHIPPED_TOKENIZER)
    p.add_argument("--shipped-generator", type=Path, default=SHIPPED_GENERATOR)
    p.add_argument("--out", type=Path, default=None, help="write the verdict here as JSON")
    args = p.parse_args(argv)
    try:
        result = verdict(_read(args.tokenizer), _read(args.generator), _read(args.shipped_tokenizer),
                         _read(args.shipped_generator))
    except KeyError as err:
        raise SystemExit(f"ship_check: {err.args[0]}") from None
    print(format_table(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0  # the verdict is in the output; a "keep" is not a failed run


if __name__ == "__main__":
    sys.exit(main())
