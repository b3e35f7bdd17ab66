"""The fused model's commands: ``fedfuse fuse``, ``compress``, ``export`` and ``evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from fedfuse.cli.app import app
from fedfuse.cli.common import (
    AllowArch,
    SigningKey,
    Trust,
    console,
    reports_errors,
    signing_key_path,
)
from fedfuse.errors import FedfuseError

ArtifactDir = Annotated[Path, typer.Argument(help="fused model directory (RUN_DIR/model)")]


@app.command()
@reports_errors
def fuse(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    version: Annotated[str, typer.Option(help="semantic version for the artifact")] = "1.0.0",
    method: Annotated[Optional[str], typer.Option(
        help="auto, soft_vote, stack or distill; default: the run's fusion.method")] = None,
    signing_key: SigningKey = None,
) -> None:
    """Rebuild RUN_DIR/model from the run's cohort models and aggregate statistics, and
    sign it with the coordinator's key."""
    from fedfuse.artifact.signing import sign_run_model
    from fedfuse.artifact.signing import signing_key as load_signing_key
    from fedfuse.fusion.rebuild import fuse_run

    if method not in (None, "auto", "soft_vote", "stack", "distill"):
        raise FedfuseError(f"--method {method!r}: expected 'auto', 'soft_vote', "
                           "'stack' or 'distill'")
    key = load_signing_key(signing_key_path(signing_key))  # refused before any work
    manifest = fuse_run(run_dir, version, method)
    signer = sign_run_model(run_dir, key)
    weights = ", ".join(f"{a} {w:.3f}" for a, w in manifest["fusion"]["weights"].items())
    console.print(f"wrote {run_dir / 'model'}: version {manifest['model_version']}, "
                  f"{manifest['fusion']['method']} ({weights}), fused test accuracy "
                  f"{manifest['fused_test_accuracy']:.4f}; signed by key {signer}")


@app.command()
@reports_errors
def compress(
    artifact: ArtifactDir,
    out: Annotated[Path, typer.Option(help="the new version's directory (e.g. in a registry)")],
    prune: Annotated[float, typer.Option(
        help="fraction of each layer's smallest weights to zero, in [0, 1)")] = 0.0,
    int8: Annotated[bool, typer.Option(help="int8 weights in the dense layers")] = False,
    version: Annotated[str, typer.Option(help="semantic version for the new artifact")]
    = "1.0.1",
    signing_key: SigningKey = None,
    allow_arch: AllowArch = None,
) -> None:
    """Write a pruned and/or int8 version of ARTIFACT's fused graph (ONNX) as a new,
    signed artifact, scored on the run's test split when ARTIFACT is a run's model.
    ARTIFACT must be signed by the same key (compressing re-signs: an artifact changed
    since it was signed is never laundered into a signed version)."""
    from fedfuse.artifact.compress import compress_artifact
    from fedfuse.artifact.signing import signing_key as load_signing_key
    from fedfuse.data.sites import run_test_split

    key = load_signing_key(signing_key_path(signing_key))
    run = artifact.resolve().parent
    test = run_test_split(run) if (run / "config.toml").is_file() else None
    manifest = compress_artifact(artifact, out, prune=prune, int8=int8, semver=version,
                                 test=test, signer=key, allow_arch=tuple(allow_arch or ()),
                                 trust=(key.public_key(),))
    c = manifest["compression"]
    scored = (f"; test accuracy {c['test_accuracy']:.4f} (full: "
              f"{c['source_test_accuracy']:.4f})" if c["test_accuracy"] is not None else "")
    console.print(f"wrote {out}: version {manifest['model_version']}, {c['size_bytes'] / 1024:.0f}"
                  f" KiB (float32 ONNX: {c['fp32_onnx_size_bytes'] / 1024:.0f} KiB; the full "
                  f"artifact's files: {c['source_size_bytes'] / 1024:.0f} KiB){scored}")


@app.command()
@reports_errors
def export(
    artifact: ArtifactDir,
    out: Annotated[Path, typer.Option(help="file to write")],
    format_: Annotated[str, typer.Option("--format", help="onnx or torchscript")] = "onnx",
    int8: Annotated[bool, typer.Option(help="int8 dynamic quantisation of dense layers")] = False,
    allow_arch: AllowArch = None,
    trust: Trust = None,
) -> None:
    """Export the fused graph (probabilities out) to ONNX or TorchScript, optionally int8."""
    from fedfuse.artifact.export import Format, export_model, run_exported
    from fedfuse.artifact.predictor import FusedPredictor

    if format_ not in ("onnx", "torchscript"):
        raise FedfuseError(f"--format {format_!r}: expected 'onnx' or 'torchscript'")
    predictor = FusedPredictor.load(artifact, allow_arch=tuple(allow_arch or ()),
                                    search=str(Path.cwd()), trust=trust or None)
    fmt: Format = "onnx" if format_ == "onnx" else "torchscript"
    export_model(predictor, out, fmt, int8)
    probe = np.random.default_rng(0).normal(size=(16, *predictor.schema.input_shape))
    gap = float(np.abs(run_exported(out, fmt, probe)
                       - predictor.predict_proba(probe)).max())
    console.print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {format_}"
                  f"{', int8' if int8 else ''}); max |p_export - p_artifact| on a probe "
                  f"batch: {gap:.2e}")


@app.command("evaluate")
@reports_errors
def evaluate_cmd(
    artifact: ArtifactDir,
    data: Annotated[str, typer.Option(help="labelled .npz/.csv file, or an embedded data set")],
    label_column: Annotated[str, typer.Option(help="label column of a CSV file")] = "label",
    png: Annotated[Path, typer.Option(help="where to write the confusion-matrix plot")] = Path(
        "confusion_matrix.png"),
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="also write the report as JSON")] = None,
    allow_arch: AllowArch = None,
    trust: Trust = None,
) -> None:
    """Accuracy, per-class metrics and confusion matrix of a fused artifact on labelled data."""
    from fedfuse.artifact.evaluation import evaluate_artifact, plot_confusion
    from fedfuse.artifact.predictor import FusedPredictor
    from fedfuse.atomic import atomic_write_json
    from fedfuse.config import DataConfig, resolve_source
    from fedfuse.data.datasets import load_dataset

    predictor = FusedPredictor.load(artifact, allow_arch=tuple(allow_arch or ()),
                                    search=str(Path.cwd()), trust=trust or None)
    source = resolve_source(data, Path.cwd())
    dataset = load_dataset(DataConfig(source=source, label_column=label_column))
    report = evaluate_artifact(predictor, dataset)
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
