"""Secure-aggregation benchmark: round time with and without it, per cohort size.

    python simulations/bench/secagg.py [--sizes 10 50 100] [--rounds 4]

For each cohort size n, one cohort of n ``logreg`` clients on digits (IID split, DP off)
runs ``--rounds`` rounds twice, secure aggregation off and on, one after the other in the
same invocation. A round's time is the coordinator's wall time for training, aggregation
and evaluation (``wall_seconds`` in metrics.jsonl); the first round (engine warm-up) is
left out and the median of the rest is reported, with the ratio on/off.

Writes ``simulations/bench/results/secagg.json`` and the table between the
``bench:secagg`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import ROOT, machine, publish, simulate

SCENARIO = """
name = "secagg-bench"
seed = 11
rounds = {rounds}
[data]
source = "digits"
[partition]
method = "iid"
min_samples = 10
[[cohorts]]
arch = "logreg"
clients = {clients}
[simulation]
num_cpus = 2
"""


def round_times(workdir: Path, clients: int, rounds: int, secure: bool) -> list[float]:
    scenario = workdir / f"n{clients}.toml"
    scenario.write_text(SCENARIO.format(rounds=rounds, clients=clients))
    out = simulate(scenario, workdir / f"n{clients}-{'on' if secure else 'off'}",
                   [f"secure_aggregation.enabled={'true' if secure else 'false'}"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["wall_seconds"] for line in lines]


def table(rows: list[dict], where: str, rounds: int) -> str:
    lines = ["| clients in the cohort | round without | round with secure aggregation | "
             "with / without |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['plain_s']:.2f} s | {r['secure_s']:.2f} s | "
                     f"{r['ratio']:.2f}x |")
    lines += ["", f"Measured on {where}; median round of rounds 2..{rounds} (train, "
              "aggregate, evaluate), `logreg` on digits, IID, DP off, Flower's simulation "
              "engine with 2 CPUs."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            plain = round_times(Path(tmp), n, args.rounds, secure=False)
            secure = round_times(Path(tmp), n, args.rounds, secure=True)
            p, s = statistics.median(plain[1:]), statistics.median(secure[1:])
            rows.append({"clients": n, "plain_rounds_s": plain, "secure_rounds_s": secure,
                         "plain_s": p, "secure_s": s, "ratio": s / p})
            print(json.dumps(rows[-1]), flush=True)
    where = machine()
    publish("secagg", {"machine": where, "rounds": args.rounds, "rows": rows}, args.docs,
            table(rows, where, args.rounds))


if __name__ == "__main__":
    main()
