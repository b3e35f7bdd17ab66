"""Models benchmark: the default scenario on a user's image data, federated against
centralised (``fedfuse baseline``), with DP at the scenario's ε and without.

    python simulations/bench/models.py --data IMAGES.npz [--scenario simulations/digits.toml]
                                       [--seeds 7] [--rounds R]
    python simulations/bench/models.py ... --settings dp   # rerun one setting, keep the other
    python simulations/bench/models.py --smoke --out RESULTS.json

The scenario runs with only ``data.source`` changed (and ``privacy.mode = "off"`` for
the second setting), each run with ``--baseline``; the table gives every cohort's
federated and centralised test accuracy, the fused model's, and the gap between the
fused model and the best centralised architecture. ``--smoke`` runs the same path on a
small generated image set (``images.py``, 600 images) for two rounds, for CI.

Writes ``simulations/bench/results/models.json`` and the table between the
``bench:models`` markers in docs/models.md (``--out``: only the JSON, there).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, publish, read_json

SETTINGS = {"dp": [], "off": ['privacy.mode="off"']}
"""The privacy settings compared: the scenario's own (DP-SGD at its ε) and none."""


def run(scenario: Path, data: Path, setting: str, seed: int, rounds: int | None,
        workdir: Path) -> dict:
    out = workdir / f"{setting}-{seed}"
    cmd = [sys.executable, "-m", "fedfuse", "simulate", str(scenario), "--out", str(out),
           "--baseline", "--set", f"data.source={data}", "--set", f"seed={seed}"]
    for item in SETTINGS[setting]:
        cmd += ["--set", item]
    if rounds is not None:
        cmd += ["--rounds", str(rounds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    summary = read_json(out / "summary.json")
    base = summary["baseline"]
    return {"setting": setting, "seed": seed,
            "federated": {c: v["test_accuracy"] for c, v in summary["cohorts"].items()},
            "fused": summary["fused"]["test_accuracy"],
            "centralised": {c: v["test_accuracy"] for c, v in base["cohorts"].items()},
            "best_centralised": base["best_test_accuracy"],
            "epsilon": summary["privacy"]["max_epsilon"],
            "central_epsilon": next(iter(base["cohorts"].values()))["epsilon"],
            "wall_seconds": summary["wall_seconds"]}


def table(runs: list[dict], data: str, where: str) -> str:
    cohorts = list(runs[0]["federated"])
    lines = ["| privacy | seed | " + " | ".join(f"{c} fed / central" for c in cohorts)
             + " | fused | best central | fused − best central |",
             "|---" * (len(cohorts) + 5) + "|"]
    for r in runs:
        privacy = ("off" if r["setting"] == "off" else
                   f"ε {r['epsilon']:.2f} (central {r['central_epsilon']:.2f})")
        cells = [f"{r['federated'][c]:.3f} / {r['centralised'][c]:.3f}" for c in cohorts]
        gap = 100 * (r["fused"] - r["best_centralised"])
        lines.append(f"| {privacy} | {r['seed']} | " + " | ".join(cells)
                     + f" | {r['fused']:.3f} | {r['best_centralised']:.3f} | {gap:+.1f} pt |")
    lines += ["", f"Data: {data}. Measured on {where}; one run per seed and setting."]
    return "\n".join(lines)


def smoke_data(workdir: Path) -> Path:
    """600 generated 28x28 images (``images.py``), for the CI smoke run."""
    from images import generate, write_npz

    X, y = generate(n=600, seed=0)
    path = workdir / "smoke.npz"
    write_npz(path, {"X": X, "y": y})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an image data set (.npz: X, y)")
    parser.add_argument("--scenario", type=Path, default=ROOT / "simulations" / "digits.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="the privacy settings to run; the published table keeps the "
                             "last results of the others")
    parser.add_argument("--smoke", action="store_true", help="a small generated set, 2 rounds")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the results JSON here instead of publishing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = smoke_data(workdir) if args.smoke else args.data
        if data is None:
            parser.error("give --data IMAGES.npz, or --smoke")
        rounds = 2 if args.smoke else args.rounds
        runs = [run(args.scenario, data.resolve(), setting, seed, rounds, workdir)
                for setting in args.settings for seed in args.seeds]
    previous = ROOT / "simulations" / "bench" / "results" / "models.json"
    if args.out is None and previous.is_file():
        kept = [r for r in read_json(previous)["runs"] if r["setting"] not in args.settings]
        runs = sorted(kept + runs, key=lambda r: (list(SETTINGS).index(r["setting"]),
                                                  r["seed"]))
    results = {"machine": machine(), "data": str(data), "runs": runs}
    if args.out is not None:
        from fedfuse.atomic import atomic_write_json

        atomic_write_json(args.out, results)
    else:
        publish("models", results, ROOT / "docs" / "models.md",
                table(runs, data.name, results["machine"]))
    print(table(runs, data.name, results["machine"]))


if __name__ == "__main__":
    main()
