"""The ``fedfuse`` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

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
    flwr_logger = logging.getLogger("flwr")  # has its own console handler
    flwr_logger.propagate = False
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.WARNING)


def _fail(exc: FedfuseError) -> None:
    console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False,
                  soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def simulate(
    config: Annotated[Path, typer.Argument(help="scenario TOML file")],
    out: Annotated[Optional[Path], typer.Option(help="run directory to create")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="override the number of rounds")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key: --set partition.alpha=0.3 (repeatable)")] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's own logs")] = False,
) -> None:
    """Run a scenario on Flower's simulation engine and write a run directory."""
    from fedfuse.config import load_config

    try:
        cfg = load_config(config, overrides=set_ or [], rounds=rounds)
        if verbose:
            cfg.simulation.verbose = True
        from fedfuse.simulate import simulate as run_scenario  # imports flwr first

        _setup_logging(cfg.simulation.verbose)

        summary, run_dir = run_scenario(cfg, out, console)
    except FedfuseError as exc:
        _fail(exc)
    table = Table(title=f"{cfg.name}: {summary['rounds']} rounds, {summary['clients']} clients")
    table.add_column("cohort")
    table.add_column("clients", justify="right")
    table.add_column("test accuracy", justify="right")
    for arch, c in summary["cohorts"].items():
        table.add_row(arch, str(c["clients"]), f"{c['test_accuracy']:.4f}")
    if summary["fused"]:
        f = summary["fused"]
        weights = ", ".join(f"{a} {w:.2f}" for a, w in f["weights"].items())
        table.add_row(f"[bold]fused[/bold] ({f['method']}: {weights})", str(summary["clients"]),
                      f"[bold]{f['test_accuracy']:.4f}[/bold]")
    console.print(table)
    console.print(f"wall time {summary['wall_seconds']:.1f} s; run directory: {run_dir}")


@app.command()
def fuse(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    version: Annotated[str, typer.Option(help="semantic version for the artifact")] = "1.0.0",
) -> None:
    """Rebuild RUN_DIR/model from the run's cohort models and aggregate statistics."""
    from fedfuse.refuse import fuse_run

    try:
        manifest = fuse_run(run_dir, version)
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
    from fedfuse.artifact import FusedPredictor
    from fedfuse.export import export_model, run_exported

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
    from fedfuse.artifact import FusedPredictor
    from fedfuse.atomic import atomic_write_json
    from fedfuse.config import DataConfig, resolve_source
    from fedfuse.data import load_dataset
    from fedfuse.evaluation import evaluate_artifact, plot_confusion

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


def main() -> None:
    app()
