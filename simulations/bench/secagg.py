"""Secure-aggregation benchmark: round time with and without it, per cohort size.

    python simulations/bench/secagg.py [--sizes 10 50 100] [--rounds 4] [--neighbours 20]

For each cohort size n, one cohort of n ``logreg`` clients on digits (IID split, DP off)
runs ``--rounds`` rounds with secure aggregation off; on, semi-honest (every member
shares with every other, no consistency check, threshold 0.6); on as by default (with
the consistency check, threshold 0.7); and, where ``--neighbours`` k < n - 1, on with
SecAgg+ neighbourhoods of k and the check, one after the other in the same invocation. A round's time is the coordinator's wall time for training, aggregation
and evaluation (``wall_seconds`` in metrics.jsonl); the first round (engine warm-up) is
left out and the median of the rest is reported, with the ratio on/off.

It also times the protocol's own computation, without any messaging: all four stages for
n clients run in this process (the test suite's in-process harness, real handlers), for a
vector the size of the ``logreg`` model. Per stage it reports the clients' time (summed
over all clients) and the coordinator's.

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

from fedfuse.secagg.encoding import payload_length

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


BEFORE = {10: (0.52, 1.14), 50: (1.16, 3.39), 100: (2.41, 8.23)}
"""Median round without / with secure aggregation before issue 22 (five exchanges a
secure round, two a plaintext one), from this bench's run published with d4793e3."""


def round_times(workdir: Path, clients: int, rounds: int, secure: bool,
                neighbours: int = 0, check: bool = True) -> list[float]:
    scenario = workdir / f"n{clients}.toml"
    scenario.write_text(SCENARIO.format(rounds=rounds, clients=clients))
    name = f"n{clients}-{'on' if secure else 'off'}-k{neighbours}-{'check' if check else 'sh'}"
    out = simulate(scenario, workdir / name,
                   [f"secure_aggregation.enabled={'true' if secure else 'false'}",
                    f"secure_aggregation.neighbours={neighbours}",
                    f"secure_aggregation.consistency_check={'true' if check else 'false'}",
                    f"secure_aggregation.threshold={0.7 if check else 0.6}"])
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["wall_seconds"] for line in lines]


def logreg_payload() -> int:
    """Entries of a masked vector for the bench's model (logreg on digits)."""
    from flwr.app import ArrayRecord

    from fedfuse.data.datasets import load_dataset
    from fedfuse.config import DataConfig
    from fedfuse.models.registry import build_model
    from fedfuse.coordinator.sessions import sizes

    model = build_model("logreg", load_dataset(DataConfig()).schema)
    return payload_length(sizes(ArrayRecord(model.state_dict())))


def protocol_compute(clients: int, length: int, neighbours: int = 0,
                     repeats: int = 3) -> dict[str, float]:
    """Median seconds per stage of one session (with the consistency check), clients'
    time summed over all clients."""
    from fedfuse.compat import task_identity

    with task_identity():
        runs = [stage_times(clients, length, neighbours) for _ in range(repeats)]
    med = [statistics.median(col) for col in zip(*runs)]
    return {"setup_s": med[0], "share_clients_s": med[1], "share_coordinator_s": med[2],
            "mask_clients_s": med[3], "check_clients_s": med[4], "check_coordinator_s": med[5],
            "unmask_clients_s": med[6], "unmask_coordinator_s": med[7]}


def stage_times(clients: int, length: int, neighbours: int) -> list[float]:
    """Seconds each protocol stage of one fresh session took, in order."""
    import time

    from fedfuse.secagg import consistency
    from tests.helpers import SecAggHarness as Harness

    h = Harness(clients, 0.7, length=length, neighbours=neighbours, verify=True,
                consistency=True)
    held: dict[str, list] = {}
    steps = [
        h.keys,
        lambda: held.__setitem__("shares", h.answer(h.requests("share"))),
        lambda: h.session.receive_shares(held["shares"]),
        h.masked,
        lambda: held.__setitem__("check", h.answer(h.requests("check"))),
        lambda: consistency.receive_signatures(h.session, held["check"]),
        lambda: held.__setitem__("unmask", h.answer(h.requests("unmask"))),
        lambda: h.session.receive_unmask(held["unmask"]),
    ]
    times = []
    for step in steps:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def table(rows: list[dict], where: str, rounds: int, k: int) -> str:
    lines = ["| clients in the cohort | round without | secure, semi-honest (every member) "
             "| ratio | secure with the consistency check (default) | ratio | check / "
             "semi-honest | with SecAgg+, " f"{k} neighbours, and the check | ratio | "
             "before issue 22: without, with, ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        was = BEFORE.get(r["clients"])
        before = f"{was[0]:.2f} s, {was[1]:.2f} s, {was[1] / was[0]:.2f}x" if was else "-"
        sparse = (f"{r['sparse_s']:.2f} s | {r['sparse_ratio']:.2f}x" if "sparse_s" in r
                  else "- (complete graph) | -")
        lines.append(f"| {r['clients']} | {r['plain_s']:.2f} s | {r['secure_s']:.2f} s | "
                     f"{r['ratio']:.2f}x | {r['checked_s']:.2f} s | {r['checked_ratio']:.2f}x "
                     f"| {r['checked_s'] / r['secure_s']:.2f}x | {sparse} | {before} |")
    lines += ["", f"Measured on {where}; median round of rounds 2..{rounds} (train, "
              "aggregate, evaluate), `logreg` on digits, IID, DP off, Flower's simulation "
              "engine with 2 CPUs. A semi-honest secure round exchanges two batches "
              "of messages (train with evaluation folded in, carrying the next round's "
              "setup; unmask, carrying its share stage), one with the consistency check "
              "three (train; check, carrying the share stage; unmask), one without "
              "secure aggregation one (train). "
              "Before issue 22 (commit d4793e3, docs/secure-aggregation.md#cost): five "
              "and two. SecAgg+ (`secure_aggregation.neighbours`) trades a bounded "
              "probability of a weaker guarantee for O(k) work per member: "
              "docs/secure-aggregation.md#neighbourhoods.", "",
              "Protocol computation per session, in process (no messaging), "
              f"{rows[0]['vector_length']}-entry vector, signed keys verified, with the "
              "consistency check:", "",
              "| clients | neighbours | clients' work, all stages, per client | "
              "of which the check (signing; verifying at unmask is in unmask) | "
              "coordinator, all stages |", "|---|---|---|---|---|"]
    for r in rows:
        for label, c in (("all", r["compute"]), (str(k), r.get("sparse_compute"))):
            if c is None:
                continue
            per_client = (c["setup_s"] + c["share_clients_s"] + c["mask_clients_s"]
                          + c["check_clients_s"] + c["unmask_clients_s"]) / r["clients"]
            coordinator = (c["share_coordinator_s"] + c["check_coordinator_s"]
                           + c["unmask_coordinator_s"])
            lines.append(f"| {r['clients']} | {label} | {per_client * 1e3:.1f} ms | "
                         f"{c['check_clients_s'] / r['clients'] * 1e3:.2f} ms | "
                         f"{coordinator * 1e3:.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--neighbours", type=int, default=20)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    rows = []
    k = args.neighbours
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            plain = round_times(Path(tmp), n, args.rounds, secure=False)
            secure = round_times(Path(tmp), n, args.rounds, secure=True, check=False)
            checked = round_times(Path(tmp), n, args.rounds, secure=True)
            p, s = statistics.median(plain[1:]), statistics.median(secure[1:])
            c = statistics.median(checked[1:])
            length = logreg_payload()
            row = {"clients": n, "plain_rounds_s": plain, "secure_rounds_s": secure,
                   "checked_rounds_s": checked, "plain_s": p, "secure_s": s, "ratio": s / p,
                   "checked_s": c, "checked_ratio": c / p, "vector_length": length,
                   "compute": protocol_compute(n, length)}
            if k < n - 1:
                sparse = round_times(Path(tmp), n, args.rounds, secure=True, neighbours=k)
                row.update({"neighbours": k, "sparse_rounds_s": sparse,
                            "sparse_s": statistics.median(sparse[1:]),
                            "sparse_ratio": statistics.median(sparse[1:]) / p,
                            "sparse_compute": protocol_compute(n, length, k)})
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    where = machine()
    publish("secagg", {"machine": where, "rounds": args.rounds, "neighbours": k, "rows": rows},
            args.docs, table(rows, where, args.rounds, k))


if __name__ == "__main__":
    main()
