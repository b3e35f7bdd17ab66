"""The predict API's commands: ``fedfuse serve``, ``keys create|list|revoke`` and
``query``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from fedfuse.cli.app import app
from fedfuse.cli.common import AllowArch, Trust, console, reports_errors
from fedfuse.errors import FedfuseError

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the predict server.")
app.add_typer(keys_app, name="keys")
KeysFile = Annotated[Path, typer.Option("--file", help="the keys file (created if absent)")]


@app.command()
@reports_errors
def serve(
    source: Annotated[Path, typer.Argument(help="an artifact (RUN_DIR/model) or a directory "
                                                "of artifacts (one per version)")],
    config: Annotated[Optional[Path], typer.Option(help="TOML file with a [serve] table")] = None,
    host: Annotated[Optional[str], typer.Option(help="address to bind [127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port [8000]")] = None,
    api_keys: Annotated[Optional[Path], typer.Option(
        help="keys file (fedfuse keys create)")] = None,
    tls_cert: Annotated[Optional[Path], typer.Option(help="PEM certificate for HTTPS")] = None,
    tls_key: Annotated[Optional[Path], typer.Option(help="PEM private key for HTTPS")] = None,
    rate_limit: Annotated[Optional[str], typer.Option(help="per key, e.g. 100/second")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="rows per forward pass")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option(help="batch forming delay")] = None,
    max_queue: Annotated[Optional[int], typer.Option(
        help="requests waiting at most; more get 503 [1024]")] = None,
    reload_interval: Annotated[Optional[float], typer.Option(
        help="seconds between rescans of SOURCE and the keys file; 0: off")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="cpu, cuda, cuda:N or auto: where the forward pass runs [cpu]")] = None,
    grpc_port: Annotated[Optional[int], typer.Option(
        help="also serve the Open Inference Protocol over gRPC on this port")] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="the model's name in the Open Inference Protocol (/v2/models/NAME) [fedfuse]")]
    = None,
    trust: Trust = None,
    allow_arch: AllowArch = None,
    workers: Annotated[Optional[int], typer.Option(
        help="server processes on the port, sharing rate limits and metrics [1]")] = None,
) -> None:
    """Serve the fused model over HTTP: /v1/predict, /v1/model, the Open Inference
    Protocol's /v2 endpoints, /healthz, /readyz, /metrics."""
    from fedfuse.serving.config import serve_config
    from fedfuse.serving.server import serve as run_server

    # one plain line per event: server logs go to files and collectors, not a terminal
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"host": host, "port": port, "rate_limit": rate_limit,
               "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
               "max_queue": max_queue, "reload_interval": reload_interval, "device": device,
               "allow_arch": allow_arch or None,
               "trust": [str(t) for t in trust] if trust else None,
               "model_name": model_name, "grpc_port": grpc_port, "workers": workers,
               **{k: str(v) if v is not None else None for k, v in
                  (("api_keys", api_keys), ("tls_cert", tls_cert), ("tls_key", tls_key))}}
    run_server(serve_config(config, options), source)


@keys_app.command("create")
@reports_errors
def keys_create(
    file: KeysFile,
    name: Annotated[str, typer.Option(help="who the key is for")] = "default",
    quiet: Annotated[bool, typer.Option(help="print the key only")] = False,
) -> None:
    """Create a key: it is printed once; the file keeps only its SHA-256."""
    from fedfuse.serving.auth import create_key

    stored, key = create_key(file, name)
    if not quiet:
        console.print(f"created key {stored.id} ({name}) in {file}; it is shown only now:")
    print(key)


@keys_app.command("list")
@reports_errors
def keys_list(file: KeysFile) -> None:
    """The keys of FILE: id, name, creation time (never the keys themselves)."""
    from fedfuse.serving.auth import read_keys

    keys = read_keys(file)
    table = Table(title=f"{len(keys)} API keys in {file}")
    for col in ("id", "name", "created"):
        table.add_column(col)
    for k in keys:
        table.add_row(k.id, k.name, k.created_at)
    console.print(table)


@keys_app.command("revoke")
@reports_errors
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")],
                file: KeysFile) -> None:
    """Remove a key; a running server stops accepting it at its next rescan."""
    from fedfuse.serving.auth import revoke_key

    stored = revoke_key(file, key_id)
    console.print(f"revoked key {stored.id} ({stored.name})")


@app.command()
@reports_errors
def query(
    url: Annotated[str, typer.Argument(
        help="the server, e.g. http://127.0.0.1:8000, or grpc://127.0.0.1:8001 for the "
             "Open Inference Protocol over gRPC")],
    data: Annotated[Optional[str], typer.Option(
        help="labelled .npz/.csv file, or an embedded data set")] = None,
    run: Annotated[Optional[Path], typer.Option(
        help="instead of --data: the held-out test split of this run directory")] = None,
    label_column: Annotated[str, typer.Option(help="label column of a CSV file")] = "label",
    api_key: Annotated[Optional[str], typer.Option(envvar="FEDFUSE_API_KEY",
                                                   help="API key [$FEDFUSE_API_KEY]")] = None,
    batch: Annotated[int, typer.Option(help="instances per request")] = 64,
    wait: Annotated[float, typer.Option(help="seconds to wait for the server to be ready")] = 0.0,
    ca: Annotated[Optional[Path], typer.Option(help="CA certificate to trust for HTTPS")] = None,
) -> None:
    """Send labelled data to a predict server (HTTP, or gRPC); print its accuracy and
    version."""
    from fedfuse.config import DataConfig, resolve_source
    from fedfuse.data.datasets import load_dataset
    from fedfuse.data.sites import run_test_split
    from fedfuse.serving.client import PredictClient

    if (data is None) == (run is None):
        raise FedfuseError("give exactly one of --data FILE and --run RUN_DIR")
    if batch < 1:
        raise FedfuseError(f"--batch must be >= 1, got {batch}")
    dataset = run_test_split(run) if run is not None else load_dataset(
        DataConfig(source=resolve_source(str(data), Path.cwd()), label_column=label_column))
    with PredictClient(url, api_key=api_key, verify=str(ca) if ca else True) as client:
        if wait > 0:
            client.wait_ready(wait)
        answers = [client.predict(dataset.X[i:i + batch])
                   for i in range(0, len(dataset), batch)]
    predicted = np.concatenate([a.labels for a in answers])
    truth = np.array(dataset.schema.class_labels)[dataset.y]
    what = f"the test split of {run}" if run is not None else str(data)
    console.print(f"{url}: model {answers[0].model_version} labelled {len(predicted)} "
                  f"instances of {what} in {len(answers)} requests; accuracy "
                  f"{float((predicted == truth).mean()):.4f}")
