"""Deployment benchmark: a deployed round against the same round simulated.

    python simulations/bench/deploy.py [--sites 3 10] [--rounds 6]

For each number of sites n: ``fedfuse certs init`` and ``fedfuse partition`` write n
sites' keys and data, then a ``fedfuse coordinator`` and n ``fedfuse site`` processes
run on 127.0.0.1 (TLS, node authentication, record-level DP with ε ≤ 8, secure
aggregation; ``logreg`` on digits), and the same scenario is simulated with n clients in
the same invocation. A round's time is the coordinator's wall time for the round
(``wall_seconds`` in metrics.jsonl; the first round, which also opens the sessions, is
reported apart) and the median of the others is reported for each, with their ratio.

Where a deployed round's time goes comes from the sites' own accounts: each ``fedfuse
site`` logs every message it handles (``fedfuse.site`` at DEBUG, with ``--verbose``):
the time from claiming its task until its content had arrived (pull), the ClientApp's
run (work) and pushing the reply (reply). Over the rounds after the first, the bench
reports the messages each site answered per round and, for the site that spent the
most, its pull, work and reply time per round; the rest of a round is the coordinator's
own work and the messages' way between the processes.

Writes ``simulations/bench/results/deploy.json`` and the table between the
``bench:deploy`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, publish, simulate

FEDFUSE = [sys.executable, "-m", "fedfuse"]

SCENARIO = """
name = "deploy-bench"
seed = 7
rounds = {rounds}
round_timeout = 120.0
[data]
source = "{test}"
val_fraction = 0.2
[partition]
method = "dirichlet"
alpha = 0.5
min_samples = 15
[[cohorts]]
arch = "logreg"
{members}
[privacy]
mode = "sample"
target_epsilon = 8.0
max_grad_norm = 1.0
[secure_aggregation]
enabled = true
[deployment]
wait_for_sites = 300.0
[simulation]
num_cpus = 2
"""

TASK_LINE = re.compile(r"task (\S+): pull ([0-9.]+) s, work ([0-9.]+) s, reply ([0-9.]+) s")


def names(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: object) -> None:
    proc = subprocess.run([*FEDFUSE, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fedfuse {' '.join(map(str, args))} failed:\n{proc.stderr[-2000:]}")


def scenario(path: Path, n: int, rounds: int, deployed: bool) -> Path:
    members = (f"sites = {json.dumps(names(n))}" if deployed else f"clients = {n}")
    path.write_text(SCENARIO.format(rounds=rounds, test=path.parent / "data" / "test.npz",
                                    members=members))
    return path


def start(log: Path, *args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*FEDFUSE, *map(str, args)], cwd=ROOT, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"})


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def deployed(work: Path, n: int, rounds: int) -> tuple[list[float], dict[str, list[list]]]:
    """Round times of a deployment of n sites, and each site's logged tasks."""
    cli("certs", "init", work / "certs", "--demo-sites", ",".join(names(n)))
    toml = scenario(work / "deploy.toml", n, rounds, deployed=True)
    cli("partition", toml, "--out", work / "data", "--set", "data.source=digits")
    port = free_port()
    coord = start(work / "coordinator.log", "coordinator", toml, "--certs", work / "certs",
                  "--address", f"127.0.0.1:{port}", "--out", work / "run",
                  "--state", work / "coordinator-state")
    sites = [start(work / f"{s}.log", "site", "--coordinator", f"127.0.0.1:{port}",
                   "--certs", work / "certs", "--name", s, "--data", work / "data" / f"{s}.npz",
                   "--state", work / f"state-{s}", "--runtime-port", free_port(), "--verbose")
             for s in names(n)]
    try:
        code = coord.wait(timeout=3600)
    finally:
        for p in [*sites, coord]:
            stop(p)
    if code != 0:
        raise SystemExit(f"deployment failed:\n{(work / 'coordinator.log').read_text()[-3000:]}")
    times = [json.loads(line)["wall_seconds"]
             for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    tasks = {s: [[m[1], float(m[2]), float(m[3]), float(m[4])]
                 for m in TASK_LINE.finditer((work / f"{s}.log").read_text(errors="replace"))]
             for s in names(n)}
    return times, tasks


def simulated(work: Path, n: int, rounds: int) -> list[float]:
    toml = scenario(work / "sim.toml", n, rounds, deployed=False)
    out = simulate(toml, work / "sim", ["data.source=digits"])
    return [json.loads(line)["wall_seconds"]
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def steady(tasks: list[list]) -> list[list]:
    """A site's tasks of the rounds after the first: from its second train message up to
    the fusion's first message."""
    trains = [i for i, t in enumerate(tasks) if t[0] == "train"]
    end = next((i for i, t in enumerate(tasks) if t[0] == "query.fusion"), len(tasks))
    return tasks[trains[1]:end] if len(trains) > 1 else []


def breakdown(tasks: dict[str, list[list]], rounds: int) -> dict[str, float]:
    """Per round after the first, from the sites' logs: the messages a site answered,
    and the pull, work and reply seconds of the site that spent the most."""
    per_site = {s: steady(ts) for s, ts in tasks.items()}
    busiest = max(per_site.values(), key=lambda ts: sum(t[1] + t[2] + t[3] for t in ts))
    later = rounds - 1
    return {"messages_per_site_per_round": round(len(busiest) / later, 2),
            "pull_s_per_round": round(sum(t[1] for t in busiest) / later, 4),
            "work_s_per_round": round(sum(t[2] for t in busiest) / later, 4),
            "reply_s_per_round": round(sum(t[3] for t in busiest) / later, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    results: dict = {"machine": machine(), "rounds": args.rounds, "points": []}
    for n in args.sites:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            dep, tasks = deployed(work, n, args.rounds)
            sim = simulated(work, n, args.rounds)
        point = {"sites": n, "deployed_round_s": statistics.median(dep[1:]),
                 "simulated_round_s": statistics.median(sim[1:]),
                 "deployed_first_round_s": dep[0], "simulated_first_round_s": sim[0],
                 "deployed_rounds_s": dep, "simulated_rounds_s": sim,
                 **breakdown(tasks, args.rounds)}
        point["ratio"] = round(point["deployed_round_s"] / point["simulated_round_s"], 2)
        print(json.dumps(point), flush=True)
        results["points"].append(point)
    publish("deploy", results, ROOT / "docs" / "benchmarks.md", table(results))


def table(results: dict) -> str:
    rows = ["| sites | deployed round (median) | simulated round (median) | deployed / "
            "simulated | first round, deployed / simulated | messages per site per round | "
            "busiest site per round: pull, work, reply |", "|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        rows.append(f"| {p['sites']} | {p['deployed_round_s']:.2f} s | "
                    f"{p['simulated_round_s']:.2f} s | {p['ratio']:.1f}x | "
                    f"{p['deployed_first_round_s']:.1f} s / {p['simulated_first_round_s']:.1f} s"
                    f" | {p['messages_per_site_per_round']} | {p['pull_s_per_round']:.2f} s, "
                    f"{p['work_s_per_round']:.2f} s, {p['reply_s_per_round']:.2f} s |")
    return (f"{results['machine']}; {results['rounds']} rounds, logreg on digits, DP "
            "(ε ≤ 8) and secure aggregation on; every process on this one machine; JSON "
            "in simulations/bench/results/deploy.json.\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
