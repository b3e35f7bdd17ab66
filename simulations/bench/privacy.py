"""Privacy benchmark: test accuracy against ε, and the cost of DP-SGD per local epoch.

    python simulations/bench/privacy.py [--scenario simulations/digits.toml] [--seeds 7]

1. Runs the scenario (default: the default scenario) once per ε in {1, 3, 8, ∞} (∞: DP
   off, with the plain-SGD defaults), and once with client-level DP (``privacy.mode =
   "user"``) at ε = 8, and collects every cohort's and the fused model's test accuracy.
2. Times one local epoch of each architecture on the scenario's whole training pool,
   plain and wrapped by Opacus (same model, data, batch size), alternating the two,
   and reports the median DP/plain ratio.

Writes ``simulations/bench/results/privacy.json`` and the table between the
``bench:privacy`` markers in docs/privacy.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, add_device_option, machine, publish, read_json, simulate

from fedfuse.config import load_config  # noqa: E402
from fedfuse.models.device import resolve_device  # noqa: E402
from fedfuse.models.registry import build_model, learning_rate  # noqa: E402
from fedfuse.privacy.dpsgd import make_private  # noqa: E402
from fedfuse.simulation.baseline import pooled_data  # noqa: E402
from fedfuse.models.training import make_loader, make_optimizer, train_epochs  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0, None)
USER_EPSILON = 8.0


def run_scenario(scenario: Path, epsilon: float | None, seed: int, workdir: Path,
                 mode: str = "sample", device: str = "cpu") -> dict:
    privacy = (["privacy.mode=\"off\""] if epsilon is None
               else [f"privacy.mode=\"{mode}\"", f"privacy.target_epsilon={epsilon}"])
    out = simulate(scenario, workdir / f"{mode}-eps-{epsilon}-seed-{seed}",
                   [f"seed={seed}", f"device=\"{device}\"", *privacy])
    summary = read_json(out / "summary.json")
    return {"epsilon": epsilon, "mode": mode if epsilon is not None else "off", "seed": seed,
            "max_epsilon": summary["privacy"]["max_epsilon"],
            "cohorts": {a: c["test_accuracy"] for a, c in summary["cohorts"].items()},
            "fused": summary["fused"]["test_accuracy"] if summary["fused"] else None,
            "wall_seconds": summary["wall_seconds"]}


def time_epochs(scenario: Path, repeats: int, device: str = "cpu") -> dict:
    """Median seconds per local epoch, plain vs DP-SGD, per architecture, on ``device``
    (a GPU's queued work is waited for before each clock reading)."""
    dev = resolve_device(device, "--device")

    def clock() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    cfg = load_config(scenario)
    train = pooled_data(cfg)[0]
    batch = cfg.train.resolved(private=True).batch_size
    torch.set_num_threads(1)
    out = {}
    for cohort in cfg.cohorts:
        lr = learning_rate(cohort.model, True, train.schema)
        plain, private = [], []
        for r in range(repeats + 1):  # the first pair warms up
            model = build_model(cohort.model, train.schema, seed=r).to(dev)
            loader = make_loader(train.X, train.y, batch, seed=r)
            opt = make_optimizer(model, lr, 0.0, 0.0)
            t0 = clock()
            train_epochs(model, loader, opt, 1)
            t_plain = clock() - t0
            model = build_model(cohort.model, train.schema, seed=r).to(dev)
            opt = make_optimizer(model, lr, 0.0, 0.0)
            t0 = clock()
            m, o, dl, _ = make_private(model, opt, loader, noise_multiplier=1.0,
                                       max_grad_norm=1.0, accountant="rdp", history=[],
                                       generator=torch.Generator().manual_seed(r))
            t_setup = clock() - t0
            t0 = clock()
            train_epochs(m, dl, o, 1)
            t_dp = clock() - t0
            if r:
                plain.append(t_plain)
                private.append((t_dp, t_setup))
        p = statistics.median(plain)
        d = statistics.median(t for t, _ in private)
        s = statistics.median(t for _, t in private)
        out[cohort.arch] = {"examples": len(train), "batch_size": batch,
                            "plain_epoch_s": p, "dp_epoch_s": d, "dp_setup_s": s,
                            "ratio": d / p, "ratio_with_setup": (d + s) / p}
    return out


def table(runs: list[dict], timing: dict, machine: str) -> str:
    archs = list(runs[0]["cohorts"])
    lines = ["| ε per client | " + " | ".join(archs) + " | fused | max ε spent |",
             "|---" * (len(archs) + 3) + "|"]
    for r in runs:
        eps = "∞ (DP off)" if r["epsilon"] is None else f"{r['epsilon']:g}"
        if r["mode"] == "user":
            eps += " (client-level, `user`)"
        spent = "—" if r["max_epsilon"] is None else f"{r['max_epsilon']:.3f}"
        lines.append(f"| {eps} | " + " | ".join(f"{r['cohorts'][a]:.4f}" for a in archs)
                     + f" | {r['fused']:.4f} | {spent} |")
    lines += ["", "| model | plain epoch | DP-SGD epoch | DP / plain | DP / plain with setup |",
              "|---|---|---|---|---|"]
    for arch, t in timing.items():
        lines.append(f"| {arch} | {t['plain_epoch_s'] * 1e3:.1f} ms | "
                     f"{t['dp_epoch_s'] * 1e3:.1f} ms | {t['ratio']:.2f}x | "
                     f"{t['ratio_with_setup']:.2f}x |")
    lines += ["", f"Measured on {machine}; one local epoch over the {t['examples']} training "
              f"examples, expected batch {t['batch_size']}, one torch thread, median of the "
              "repeats."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", type=Path, default=ROOT / "simulations" / "digits.toml")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "privacy.md")
    add_device_option(ap)
    args = ap.parse_args()
    where = machine(args.device)
    timing = time_epochs(args.scenario, args.repeats, args.device)
    print(json.dumps(timing, indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for eps, mode in [(e, "sample") for e in EPSILONS] + [(USER_EPSILON, "user")]:
            runs.append(run_scenario(args.scenario, eps, args.seed, Path(tmp), mode,
                                     args.device))
            print(json.dumps(runs[-1]), flush=True)
    results = {"scenario": str(args.scenario.relative_to(ROOT)), "machine": where,
               "device": args.device, "runs": runs, "epoch_timing": timing}
    publish("privacy", results, args.docs, table(runs, timing, where))


if __name__ == "__main__":
    main()
