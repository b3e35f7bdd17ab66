"""Fusion benchmark: every member, the soft vote and the distilled student, side by side.

    python simulations/bench/fusion.py [--scenario simulations/digits.toml] [--seeds 7 8 9]

Runs the scenario once per seed with ``fusion.unlabeled_fraction`` (default 0.5) so that
the coordinator distils a student, and collects each member's, the soft vote's and the
student's test accuracy, both methods' validation Brier scores and what ``auto`` served.

Writes ``simulations/bench/results/fusion.json`` and the table between the
``bench:fusion`` markers in docs/fusion.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import ROOT, machine, publish, read_json, simulate


def run_seed(scenario: Path, seed: int, fraction: float, workdir: Path) -> dict:
    out = simulate(scenario, workdir / f"seed-{seed}",
                   [f"seed={seed}", f"fusion.unlabeled_fraction={fraction}"])
    summary = read_json(out / "summary.json")
    fused = summary["fused"]
    return {"seed": seed,
            "cohorts": {a: c["test_accuracy"] for a, c in summary["cohorts"].items()},
            "methods": fused["methods"], "served": fused["method"],
            "wall_seconds": summary["wall_seconds"]}


def table(runs: list[dict], fraction: float, where: str) -> str:
    archs = sorted(runs[0]["cohorts"])
    lines = ["| seed | " + " | ".join(archs) + " | soft vote | distilled student | "
             "val Brier (soft vote / student) | served by `auto` |",
             "|---" * (len(archs) + 5) + "|"]
    for r in runs:
        soft, student = r["methods"]["soft_vote"], r["methods"].get("distill")
        distilled = ("—" if student is None else
                     f"{student['test_accuracy']:.3f} ({student['student']})")
        brier = (f"{soft['val_brier']:.3f}" if student is None
                 else f"{soft['val_brier']:.3f} / {student['val_brier']:.3f}")
        served = "student" if r["served"] == "distill" else "soft vote"
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['cohorts'][a]:.3f}" for a in archs)
                     + f" | {soft['test_accuracy']:.3f} | {distilled} | {brier} | {served} |")
    lines += ["", f"Measured on {where}; `fusion.unlabeled_fraction = {fraction}`, one run "
              "per seed."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "simulations" / "digits.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    ap.add_argument("--unlabeled-fraction", type=float, default=0.5)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "fusion.md")
    args = ap.parse_args()
    where = machine()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for seed in args.seeds:
            runs.append(run_seed(args.scenario, seed, args.unlabeled_fraction, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    results = {"scenario": str(args.scenario.relative_to(ROOT)), "machine": where,
               "unlabeled_fraction": args.unlabeled_fraction, "runs": runs}
    publish("fusion", results, args.docs, table(runs, args.unlabeled_fraction, where))


if __name__ == "__main__":
    main()
