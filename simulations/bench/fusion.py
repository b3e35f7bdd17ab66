"""Fusion benchmark: every member, the soft vote, the stacking head and the distilled
student, side by side.

    python simulations/bench/fusion.py [--scenario simulations/digits.toml] [--seeds 7 8 9]

Runs the scenario once per seed with ``fusion.unlabeled_fraction`` (default 0.5) so that
the coordinator distils a student, and ``fusion.stacking_rounds`` (default 5) so that it
trains a stacking head; collects each member's and each method's test accuracy, the
methods' validation Brier scores and what ``auto`` served.

Writes ``simulations/bench/results/fusion.json`` and the table between the
``bench:fusion`` markers in docs/fusion.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ROOT, machine, publish, read_json, simulate


METHODS = {"soft_vote": "soft vote", "stack": "stacking", "distill": "student"}


def run_seed(scenario: Path, seed: int, fraction: float, stacking: int, workdir: Path) -> dict:
    out = simulate(scenario, workdir / f"seed-{seed}",
                   [f"seed={seed}", f"fusion.unlabeled_fraction={fraction}",
                    f"fusion.stacking_rounds={stacking}"])
    summary = read_json(out / "summary.json")
    fused = summary["fused"]
    return {"seed": seed,
            "cohorts": {a: c["test_accuracy"] for a, c in summary["cohorts"].items()},
            "methods": fused["methods"], "served": fused["method"],
            "wall_seconds": summary["wall_seconds"]}


def table(runs: list[dict], fraction: float, stacking: int, where: str) -> str:
    archs = sorted(runs[0]["cohorts"])
    lines = ["| seed | " + " | ".join(archs) + " | soft vote | stacking | distilled student | "
             "val Brier (soft vote / stacking / student) | served by `auto` |",
             "|---" * (len(archs) + 6) + "|"]
    for r in runs:
        methods = r["methods"]
        cells = [f"{methods['soft_vote']['test_accuracy']:.3f}"]
        cells.append(f"{methods['stack']['test_accuracy']:.3f}" if "stack" in methods else "—")
        student = methods.get("distill")
        cells.append("—" if student is None else
                     f"{student['test_accuracy']:.3f} ({student['student']})")
        cells.append(" / ".join(f"{methods[m]['val_brier']:.3f}" if m in methods else "—"
                                for m in METHODS))
        cells.append(METHODS[r["served"]])
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['cohorts'][a]:.3f}" for a in archs)
                     + " | " + " | ".join(cells) + " |")
    lines += ["", f"Measured on {where}; `fusion.unlabeled_fraction = {fraction}`, "
              f"`fusion.stacking_rounds = {stacking}`, one run per seed."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "simulations" / "digits.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--unlabeled-fraction", type=float, default=0.5)
    ap.add_argument("--stacking-rounds", type=int, default=5)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "fusion.md")
    args = ap.parse_args()
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(args.scenario, seed, args.unlabeled_fraction,
                                 args.stacking_rounds, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    results = {"scenario": str(args.scenario.relative_to(ROOT)), "machine": where,
               "unlabeled_fraction": args.unlabeled_fraction,
               "stacking_rounds": args.stacking_rounds, "runs": runs}
    publish("fusion", results, args.docs,
            table(runs, args.unlabeled_fraction, args.stacking_rounds, where))


if __name__ == "__main__":
    main()
