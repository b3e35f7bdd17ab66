"""Simulation scale benchmark: client updates per second and peak memory, fedfuse
against a bare Flower FedAvg app (``scale_baseline.py``), on the same engine.

    python simulations/bench/scale.py [--sizes 10 100 500] [--rounds 5]
        [--large 1000 10000]

For each number of clients n and DP off/on, both run ``--rounds`` rounds of one ``mlp``
cohort on digits (IID split; one local epoch, batch 16, lr 0.05, no momentum; DP-SGD
with σ = 1 and C = 1), each in a fresh process (its own Ray engine, 2 CPUs, one per
client). fedfuse runs with its federated evaluation off and secure aggregation off, as
the baseline has neither. A round's time is the training exchange plus aggregation;
the first round (actor start-up) is left out and the median of the rest is reported as
n / time client updates per second. Peak memory is the largest sum of the proportional
set size (PSS, shared pages split between their users) over the process and all its
descendants (Ray's raylet, GCS and workers), sampled every 0.2 s from /proc.

The ``--large`` points (1,000 and 10,000 clients) are one ``logreg`` cohort on a
synthetic set large enough for them (scikit-learn's ``make_classification``: 150,000
rows, 20 features, 10 classes, seeded), IID, each round sampling 100 clients
(``fraction_train = 100 / n``), without DP, 3 rounds; updates/s counts the 100.

Writes ``simulations/bench/results/scale.json`` and the table between the
``bench:scale`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, add_device_option, machine, publish

SCENARIO = """
name = "scale"
seed = 0
rounds = {rounds}
[data]
source = "{source}"
test_fraction = 0.2
val_fraction = 0.1
[partition]
method = "iid"
min_samples = 2
[[cohorts]]
arch = "{arch}"
clients = {clients}
{lr}
[train]
local_epochs = 1
batch_size = 16
momentum = 0.0
[simulation]
num_cpus = 2
cpus_per_client = 1.0
fraction_train = {fraction}
fraction_evaluate = 0.0
[secure_aggregation]
enabled = false
{privacy}
"""
SAMPLED = 100
"""Clients trained per round at the large points."""

PRIVACY = """[privacy]
mode = "sample"
noise_multiplier = 1.0
max_grad_norm = 1.0
"""


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], cwd: Path) -> tuple[str, int]:
    """Run ``cmd``; returns its stdout and the peak PSS of its process tree."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(pss_bytes(p) for p in descendants(proc.pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return out, peak


def fedfuse_rounds(workdir: Path, clients: int, rounds: int, dp: bool,
                   device: str) -> tuple[list[float], int]:
    scenario = workdir / f"scale-{clients}-{dp}.toml"
    scenario.write_text(SCENARIO.format(rounds=rounds, clients=clients, source="digits",
                                        arch="mlp", lr="lr = 0.05", fraction=1.0,
                                        privacy=PRIVACY if dp else ""))
    out = workdir / f"fedfuse-{clients}-{dp}"
    _, peak = run_measured([sys.executable, "-m", "fedfuse", "simulate", str(scenario),
                            "--out", str(out), "--device", device], ROOT)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["wall_seconds"] for line in lines], peak


def baseline_rounds(clients: int, rounds: int, dp: bool,
                    device: str) -> tuple[list[float], int]:
    cmd = [sys.executable, str(ROOT / "simulations" / "bench" / "scale_baseline.py"),
           "--clients", str(clients), "--rounds", str(rounds), "--device", device
           ] + (["--dp"] if dp else [])
    out, peak = run_measured(cmd, ROOT)
    return json.loads(out.strip().splitlines()[-1])["round_seconds"], peak


def synthetic_data(path: Path) -> Path:
    """The large points' data set (see the module docstring), written once."""
    import numpy as np
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=150_000, n_features=20, n_informative=12,
                               n_classes=10, n_clusters_per_class=1, random_state=0)
    np.savez(path, X=X.astype(np.float32), y=y)
    return path


def large_point(workdir: Path, data: Path, clients: int, rounds: int) -> dict:
    """fedfuse and the baseline at ``clients``, sampling :data:`SAMPLED` a round."""
    fraction = SAMPLED / clients
    scenario = workdir / f"large-{clients}.toml"
    scenario.write_text(SCENARIO.format(rounds=rounds, clients=clients, source=data,
                                        arch="logreg", lr="", fraction=fraction,
                                        privacy=""))
    out = workdir / f"fedfuse-large-{clients}"
    _, peak = run_measured([sys.executable, "-m", "fedfuse", "simulate", str(scenario),
                            "--out", str(out)], ROOT)
    seconds = [json.loads(line)["wall_seconds"]
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    ff = summarise(SAMPLED, seconds, peak)
    ff["total_seconds"] = json.loads((out / "summary.json").read_text())["wall_seconds"]
    cmd = [sys.executable, str(ROOT / "simulations" / "bench" / "scale_baseline.py"),
           "--clients", str(clients), "--rounds", str(rounds), "--data", str(data),
           "--arch", "logreg", "--fraction", str(fraction)]
    started = time.perf_counter()
    text, base_peak = run_measured(cmd, ROOT)
    base = summarise(SAMPLED, json.loads(text.strip().splitlines()[-1])["round_seconds"],
                     base_peak)
    base["total_seconds"] = time.perf_counter() - started
    return {"clients": clients, "dp": False, "sampled": SAMPLED, "fedfuse": ff,
            "baseline": base, "ratio": ff["updates_per_second"] / base["updates_per_second"]}


def summarise(clients: int, seconds: list[float], peak: int) -> dict:
    steady = seconds[1:] or seconds
    median = statistics.median(steady)
    return {"round_seconds": seconds, "median_round_seconds": median,
            "updates_per_second": clients / median, "peak_pss_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large", type=int, nargs="*", default=[1000, 10000])
    add_device_option(parser)
    args = parser.parse_args()
    results: dict = {"machine": machine(args.device), "device": args.device,
                     "rounds": args.rounds, "points": []}
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.sizes:
            for dp in (False, True):
                ff = summarise(clients, *fedfuse_rounds(Path(tmp), clients, args.rounds, dp,
                                                        args.device))
                base = summarise(clients, *baseline_rounds(clients, args.rounds, dp,
                                                           args.device))
                point = {"clients": clients, "dp": dp, "fedfuse": ff, "baseline": base,
                         "ratio": ff["updates_per_second"] / base["updates_per_second"]}
                results["points"].append(point)
                print(json.dumps(point), flush=True)
        data = synthetic_data(Path(tmp) / "synthetic.npz") if args.large else None
        for clients in args.large:
            assert data is not None
            point = large_point(Path(tmp), data, clients, 3)
            results["points"].append(point)
            print(json.dumps(point), flush=True)
    rows = ["| clients | DP | fedfuse updates/s | baseline updates/s | ratio | fedfuse peak "
            "memory | baseline peak memory |", "|---|---|---|---|---|---|---|"]
    for p in results["points"]:
        label = f"{p['clients']:,} ({p['sampled']} a round)" if "sampled" in p \
            else str(p["clients"])
        rows.append(f"| {label} | {'on' if p['dp'] else 'off'} | "
                    f"{p['fedfuse']['updates_per_second']:.1f} | "
                    f"{p['baseline']['updates_per_second']:.1f} | {p['ratio']:.2f}x | "
                    f"{p['fedfuse']['peak_pss_mib']:.0f} MiB | "
                    f"{p['baseline']['peak_pss_mib']:.0f} MiB |")
    rows.append("")
    rows.append(f"Measured on {results['machine']}; {args.rounds} rounds per point, the "
                "median of rounds 2 onwards; Ray with 2 CPUs, one per client; the sampled "
                "points: logreg on 150,000 synthetic rows, 3 rounds, without DP"
                + (", half a GPU each." if args.device != "cpu" else "."))
    publish("scale", results, ROOT / "docs" / "benchmarks.md", "\n".join(rows))


if __name__ == "__main__":
    main()
