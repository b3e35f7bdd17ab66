"""The baseline for the scale benchmark: a bare Flower Message-API FedAvg app, written
the way Flower's quickstart apps are. Every call loads the data and its partition,
builds the model (and, with DP, Opacus's engine) and trains one local epoch. The
training itself is the same code fedfuse runs (same model, loop, batch and epochs), so
the two differ only in what the framework around them does per call.

    python simulations/bench/scale_baseline.py --clients 100 --rounds 3 [--dp]
        [--data FILE.npz --arch logreg --fraction 0.01]

Prints one JSON line: the seconds of each round (``strategy.start``'s rounds, timed
with its ``evaluate_fn`` hook, which runs after every aggregation).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.models.device import ray_gpus, resolve_device, worker_device
from fedfuse.models.registry import build_model
from fedfuse.data.partition import build_federation
from fedfuse.models.training import make_loader, make_optimizer, train_epochs

SEED = 0
BATCH = 16
LR = 0.05


def client_app(clients: int, dp: bool, device: str, data_source: str = "digits",
               arch: str = "mlp") -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        data = load_dataset(DataConfig(source=data_source))  # quickstart style: per call
        fed = build_federation(data.y, [clients], method="iid", alpha=1.0, min_samples=2,
                               test_fraction=0.2, val_fraction=0.1, seed=SEED)
        part = fed.clients[pid].train
        model = build_model(arch, data.schema)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        model.to(resolve_device(device))
        loader = make_loader(data.X[part], data.y[part], BATCH, seed=pid)
        optimizer = make_optimizer(model, LR, 0.0, 0.0)
        if dp:
            from opacus import PrivacyEngine

            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
                max_grad_norm=1.0, grad_sample_mode="ew")
        result = train_epochs(model, loader, optimizer, 1)
        state = {k: v.cpu() for k, v in (model._module if dp else model).state_dict().items()}
        return Message(RecordDict({
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": len(part), "train-loss": result.loss})}),
            reply_to=msg)

    return app


def server_app(rounds: int, times: list[float], data_source: str = "digits",
               arch: str = "mlp", fraction: float = 1.0) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        schema = load_dataset(DataConfig(source=data_source)).schema
        strategy = FedAvg(fraction_train=fraction, fraction_evaluate=0.0)

        def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            times.append(time.perf_counter())
            return MetricRecord()

        times.append(time.perf_counter())
        strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model(arch, schema,
                                                                          seed=0).state_dict()),
                       num_rounds=rounds, train_config=ConfigRecord(), evaluate_fn=mark)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dp", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--arch", default="mlp")
    parser.add_argument("--fraction", type=float, default=1.0)
    args = parser.parse_args()
    gpus = ray_gpus(args.device)
    times: list[float] = []
    run_simulation(server_app=server_app(args.rounds, times, args.data, args.arch,
                                         args.fraction),
                   client_app=client_app(args.clients, args.dp, worker_device(args.device),
                                         args.data, args.arch),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1.0,
                                                        "num_gpus": 0.5 if gpus else 0.0},
                                   "init_args": {"num_cpus": 2, "num_gpus": gpus,
                                                 "include_dashboard": False,
                                                 "logging_level": 40}})
    # times[0]: start; times[1]: the initial evaluate_fn call (round 0); then one per round
    print(json.dumps({"round_seconds": [b - a for a, b in zip(times[1:], times[2:])]}))


if __name__ == "__main__":
    main()
