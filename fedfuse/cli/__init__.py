"""The ``fedfuse`` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from fedfuse.errors import FedfuseError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Private federated learning with ensemble fusion.")
console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Private federated learning with ensemble fusion."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower API call
    flwr_logger = logging.getLogger("flwr")  # has its own console handler
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _fail(exc: FedfuseError) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False,
                  soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    config: Annotated[Optional[Path], typer.Argument(
        help="scenario TOML file (not with --resume)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run directory to create")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        help="continue the interrupted run that was to become this run directory, from "
             "its last complete round")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="override the number of rounds")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key: --set partition.alpha=0.3 (repeatable)")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="cpu, cuda, cuda:N or auto: where sites and coordinator compute "
             "(the scenario's device, default cpu)")] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's own logs")] = False,
) -> None:
    """Run a scenario on Flower's simulation engine and write a run directory."""
    from fedfuse.config import load_config
    from fedfuse.artifact.rundir import resumable_config

    try:
        if (config is None) == (resume is None):
            raise FedfuseError("give a scenario file, or --resume RUN_DIR (not both)")
        if resume is not None and (set_ or rounds or out):
            raise FedfuseError("--resume continues a run with its own settings; --set, "
                               "--rounds and --out do not apply")
        overrides = [*(set_ or []), *([f"device={device}"] if device is not None else [])]
        cfg = load_config(config or resumable_config(resume), overrides=overrides,
                          rounds=rounds)
        if verbose:
            cfg.simulation.verbose = True
        from fedfuse.simulation.runner import simulate as run_scenario  # imports flwr first

        _setup_logging(cfg.simulation.verbose)

        summary, run_dir = run_scenario(cfg, out or resume, console, resume=resume is not None)
    except FedfuseError as exc:
        _fail(exc)
    _print_summary(cfg.name, summary)
    console.print(f"wall time {summary['wall_seconds']:.1f} s; run directory: {run_dir}")


def _print_summary(name: str, summary: dict[str, Any]) -> None:
    table = Table(title=f"{name}: {summary['rounds']} rounds, {summary['clients']} clients")
    table.add_column("model")
    table.add_column("clients", justify="right")
    table.add_column("test accuracy", justify="right")
    table.add_column("served")
    for arch, c in summary["cohorts"].items():
        table.add_row(arch, str(c["clients"]), f"{c['test_accuracy']:.4f}", "")
    if summary["fused"]:
        f = summary["fused"]
        methods = f.get("methods") or {  # a run written before distillation existed
            f["method"]: {"test_accuracy": f["test_accuracy"], "weights": f["weights"]}}
        for method, score in methods.items():
            if method == "soft_vote":
                how = ", ".join(f"{a} {w:.2f}" for a, w in score["weights"].items())
            elif method == "stack":
                how = f"head trained {score['rounds']} rounds"
            else:
                how = f"{score['student']} from {score['transfer_examples']} unlabeled"
            served = method == f["method"]
            accuracy = f"{score['test_accuracy']:.4f}"
            table.add_row(f"fused, {method}: {how}", str(summary["clients"]),
                          f"[bold]{accuracy}[/bold]" if served else accuracy,
                          "[bold]yes[/bold]" if served else "")
        gain = 100 * (f["test_accuracy"] - f["best_member_test_accuracy"])
        table.caption = (f"served predictor vs the best member: {gain:+.1f} points"
                         + ("" if gain >= 1.0 else " (less than the +1 point fusion aims for)"))
    console.print(table)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
) -> None:
    """Print a finished run's table: every member, every fusion method, the one served."""
    import json

    summary_path = run_dir / "summary.json"
    try:
        if not summary_path.is_file():
            raise FedfuseError(f"{run_dir}: not a finished run directory (summary.json is "
                               "missing)")
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FedfuseError(f"{summary_path}: not valid JSON ({exc})") from None
    except FedfuseError as exc:
        _fail(exc)
    _print_summary(str(summary["scenario"]), summary)
    privacy = summary["privacy"]
    if privacy["mode"] != "off":
        console.print(f"privacy: {privacy['mode']}, max ε {privacy['max_epsilon']:.3f} at "
                      f"δ = {privacy['delta']:g}")


@app.command()
def fuse(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    version: Annotated[str, typer.Option(help="semantic version for the artifact")] = "1.0.0",
    method: Annotated[Optional[str], typer.Option(
        help="auto, soft_vote, stack or distill; default: the run's fusion.method")] = None,
) -> None:
    """Rebuild RUN_DIR/model from the run's cohort models and aggregate statistics."""
    from fedfuse.fusion.rebuild import fuse_run

    try:
        if method not in (None, "auto", "soft_vote", "stack", "distill"):
            raise FedfuseError(f"--method {method!r}: expected 'auto', 'soft_vote', "
                               "'stack' or 'distill'")
        manifest = fuse_run(run_dir, version, method)
    except FedfuseError as exc:
        _fail(exc)
    weights = ", ".join(f"{a} {w:.3f}" for a, w in manifest["fusion"]["weights"].items())
    console.print(f"wrote {run_dir / 'model'}: version {manifest['model_version']}, "
                  f"{manifest['fusion']['method']} ({weights}), fused test accuracy "
                  f"{manifest['fused_test_accuracy']:.4f}")


@app.command()
def export(
    artifact: Annotated[Path, typer.Argument(help="fused model directory (RUN_DIR/model)")],
    out: Annotated[Path, typer.Option(help="file to write")],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    int8: Annotated[bool, typer.Option(help="int8 dynamic quantisation of dense layers")] = False,
) -> None:
    """Export the fused graph (probabilities out) to ONNX or TorchScript, optionally int8."""
    from fedfuse.artifact.predictor import FusedPredictor
    from fedfuse.artifact.export import export_model, run_exported

    try:
        if format_ not in ("onnx", "torchscript"):
            raise FedfuseError(f"--format {format_!r}: expected 'onnx' or 'torchscript'")
        predictor = FusedPredictor.load(artifact)
        export_model(predictor, out, format_, int8)  # type: ignore[arg-type]
    except FedfuseError as exc:
        _fail(exc)
    probe = np.random.default_rng(0).normal(size=(16, *predictor.schema.input_shape))
    gap = float(np.abs(run_exported(out, format_, probe)  # type: ignore[arg-type]
                       - predictor.predict_proba(probe)).max())
    console.print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {format_}"
                  f"{', int8' if int8 else ''}); max |p_export - p_artifact| on a probe "
                  f"batch: {gap:.2e}")


@app.command("evaluate")
def evaluate_cmd(
    artifact: Annotated[Path, typer.Argument(help="fused model directory (RUN_DIR/model)")],
    data: Annotated[str, typer.Option(help="labelled .npz/.csv file, or an embedded data set")],
    label_column: Annotated[str, typer.Option(help="label column of a CSV file")] = "label",
    png: Annotated[Path, typer.Option(help="where to write the confusion-matrix plot")] = Path(
        "confusion_matrix.png"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the report as JSON")] = None,
) -> None:
    """Accuracy, per-class metrics and confusion matrix of a fused artifact on labelled data."""
    from fedfuse.artifact.predictor import FusedPredictor
    from fedfuse.atomic import atomic_write_json
    from fedfuse.config import DataConfig, resolve_source
    from fedfuse.data.datasets import load_dataset
    from fedfuse.artifact.evaluation import evaluate_artifact, plot_confusion

    try:
        predictor = FusedPredictor.load(artifact)
        source = resolve_source(data, Path.cwd())
        dataset = load_dataset(DataConfig(source=source, label_column=label_column))
        report = evaluate_artifact(predictor, dataset)
    except FedfuseError as exc:
        _fail(exc)
    table = Table(title=f"model {predictor.version} on {data}: accuracy {report.accuracy:.4f}")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for i, lab in enumerate(report.labels):
        table.add_row(lab, f"{report.precision[i]:.3f}", f"{report.recall[i]:.3f}",
                      f"{report.f1[i]:.3f}", str(report.support[i]))
    console.print(table)
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for lab in report.labels:
        cm.add_column(lab, justify="right")
    for lab, row in zip(report.labels, report.confusion):
        cm.add_row(lab, *map(str, row))
    console.print(cm)
    plot_confusion(report, png, f"{predictor.version} — accuracy {report.accuracy:.4f}")
    if json_out:
        atomic_write_json(json_out, report.to_dict())
    console.print(f"confusion matrix plot: {png}")


@app.command()
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
    reload_interval: Annotated[Optional[float], typer.Option(
        help="seconds between rescans of SOURCE and the keys file; 0: off")] = None,
    device: Annotated[Optional[str], typer.Option(
        help="cpu, cuda, cuda:N or auto: where the forward pass runs [cpu]")] = None,
) -> None:
    """Serve the fused model over HTTP: /v1/predict, /v1/model, /healthz, /readyz, /metrics."""
    from fedfuse.serving.config import serve_config
    from fedfuse.serving.server import serve as run_server

    # one plain line per event: server logs go to files and collectors, not a terminal
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"host": host, "port": port, "rate_limit": rate_limit,
               "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
               "reload_interval": reload_interval, "device": device,
               **{k: str(v) if v is not None else None for k, v in
                  (("api_keys", api_keys), ("tls_cert", tls_cert), ("tls_key", tls_key))}}
    try:
        run_server(serve_config(config, options), source)
    except FedfuseError as exc:
        _fail(exc)


certs_app = typer.Typer(no_args_is_help=True, help="Key material of a deployment.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="certificates directory (created)")],
    sites: Annotated[str, typer.Option(help="comma-separated site names, e.g. a,b,c")],
    host: Annotated[Optional[list[str]], typer.Option(
        help="a name or address the sites use to reach the coordinator (repeatable); "
             "localhost and 127.0.0.1 are always included")] = None,
) -> None:
    """Create a CA, the coordinator's TLS certificate and a key pair per site.

    Re-running adds what is missing (new sites) and never replaces a key."""
    from fedfuse.deploy.certs import DEFAULT_HOSTS, init_certs

    names = [n.strip() for n in sites.split(",") if n.strip()]
    try:
        if not names:
            raise FedfuseError("--sites names no site")
        created = init_certs(directory, names, [*DEFAULT_HOSTS, *(host or [])])
    except FedfuseError as exc:
        _fail(exc)
    for path in created:
        console.print(f"created {path}")
    if not created:
        console.print(f"{directory}: nothing to create (every key exists)")


@app.command()
def partition(
    config: Annotated[Path, typer.Argument(help="scenario TOML file")],
    out: Annotated[Path, typer.Option(help="directory for the .npz files")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key (repeatable)")] = None,
) -> None:
    """Write the scenario's split as files: one .npz per site (or client) and test.npz.

    For trying a deployment on one machine."""
    from fedfuse.config import load_config
    from fedfuse.data.sites import write_partitions

    try:
        paths = write_partitions(load_config(config, overrides=set_ or []), out)
    except FedfuseError as exc:
        _fail(exc)
    for path in paths:
        console.print(f"wrote {path}")


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so child Flower processes are stopped on the way out."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@app.command()
def coordinator(
    config: Annotated[Path, typer.Argument(help="scenario TOML; every cohort lists its sites")],
    certs: Annotated[Path, typer.Option(help="certificates directory (fedfuse certs init)")],
    address: Annotated[str, typer.Option(help="address the sites connect to")] = "0.0.0.0:9092",
    out: Annotated[Optional[Path], typer.Option(help="run directory to create")] = None,
    state: Annotated[Path, typer.Option(
        help="the coordinator's working directory (SuperLink log, installed app)")] = Path(
        "coordinator-state"),
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key: --set rounds=5 (repeatable)")] = None,
) -> None:
    """Run a scenario across partner sites (SuperLink with TLS and node authentication).

    Writes the same run directory, fused artifact included, as simulate."""
    from fedfuse.config import load_config

    _setup_logging(False)
    _stop_on_sigterm()
    try:
        cfg = load_config(config, overrides=set_ or [])
        from fedfuse.deploy.coordinator import run_coordinator
        from fedfuse.simulation.runner import default_run_dir

        run_dir = out or default_run_dir(cfg)
        summary = run_coordinator(cfg, certs, address, run_dir, state,
                                  lambda text: console.print(text, end="", markup=False,
                                                             highlight=False))
    except FedfuseError as exc:
        _fail(exc)
    _print_summary(cfg.name, summary)
    console.print(f"run directory: {run_dir}")


@app.command()
def site(
    coordinator: Annotated[str, typer.Option(help="the coordinator's HOST:PORT")],
    certs: Annotated[Path, typer.Option(help="this site's copy of the certificates directory "
                                             "(ca.pem and sites/NAME/)")],
    name: Annotated[str, typer.Option(help="this site's name, as in the scenario")],
    data: Annotated[Path, typer.Option(help="this site's data (.npz or .csv)")],
    state: Annotated[Optional[Path], typer.Option(
        help="state directory: privacy ledger, site secret [site-NAME-state]")] = None,
    runtime_port: Annotated[int, typer.Option(
        help="local port of the SuperNode's Runtime API (one per site on a machine)")] = 9094,
    connect_timeout: Annotated[float, typer.Option(
        help="seconds to retry an unreachable coordinator at start-up")] = 120.0,
    max_wait: Annotated[float, typer.Option(
        help="seconds to keep reconnecting after losing the coordinator")] = 600.0,
    device: Annotated[str, typer.Option(
        help="cpu, cuda, cuda:N or auto: where this site trains")] = "cpu",
) -> None:
    """Join a federation as a partner site (a Flower SuperNode on this site's data).

    The data never leave the site; its privacy ledger persists across restarts in
    --state."""
    from fedfuse.deploy.site import SiteOptions, run_site

    _setup_logging(False)
    _stop_on_sigterm()
    opts = SiteOptions(coordinator=coordinator, certs=certs, name=name, data=data,
                       state=state or Path(f"site-{name}-state"), runtime_port=runtime_port,
                       connect_timeout=connect_timeout, max_wait=max_wait, device=device)
    try:
        run_site(opts, lambda text: console.print(text, markup=False, highlight=False))
    except FedfuseError as exc:
        _fail(exc)


keys_app = typer.Typer(no_args_is_help=True, help="API keys of the predict server.")
app.add_typer(keys_app, name="keys")
KeysFile = Annotated[Path, typer.Option("--file", help="the keys file (created if absent)")]


@keys_app.command("create")
def keys_create(
    file: KeysFile,
    name: Annotated[str, typer.Option(help="who the key is for")] = "default",
    quiet: Annotated[bool, typer.Option(help="print the key only")] = False,
) -> None:
    """Create a key: it is printed once; the file keeps only its SHA-256."""
    from fedfuse.serving.auth import create_key

    try:
        stored, key = create_key(file, name)
    except FedfuseError as exc:
        _fail(exc)
    if not quiet:
        console.print(f"created key {stored.id} ({name}) in {file}; it is shown only now:")
    print(key)


@keys_app.command("list")
def keys_list(file: KeysFile) -> None:
    """The keys of FILE: id, name, creation time (never the keys themselves)."""
    from fedfuse.serving.auth import read_keys

    try:
        keys = read_keys(file)
    except FedfuseError as exc:
        _fail(exc)
    table = Table(title=f"{len(keys)} API keys in {file}")
    for col in ("id", "name", "created"):
        table.add_column(col)
    for k in keys:
        table.add_row(k.id, k.name, k.created_at)
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key's id")],
                file: KeysFile) -> None:
    """Remove a key; a running server stops accepting it at its next rescan."""
    from fedfuse.serving.auth import revoke_key

    try:
        stored = revoke_key(file, key_id)
    except FedfuseError as exc:
        _fail(exc)
    console.print(f"revoked key {stored.id} ({stored.name})")


@app.command()
def query(
    url: Annotated[str, typer.Argument(help="the server, e.g. http://127.0.0.1:8000")],
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
    """Send labelled data to a predict server over HTTP; print its accuracy and version."""
    from fedfuse.serving.client import PredictClient
    from fedfuse.config import DataConfig, resolve_source
    from fedfuse.data.datasets import load_dataset
    from fedfuse.data.sites import run_test_split

    try:
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
    except FedfuseError as exc:
        _fail(exc)
    predicted = np.concatenate([a.labels for a in answers])
    truth = np.array(dataset.schema.class_labels)[dataset.y]
    what = f"the test split of {run}" if run is not None else str(data)
    console.print(f"{url}: model {answers[0].model_version} labelled {len(predicted)} "
                  f"instances of {what} in {len(answers)} requests; accuracy "
                  f"{float((predicted == truth).mean()):.4f}")


def main() -> None:
    app()
