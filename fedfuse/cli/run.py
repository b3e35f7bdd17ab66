"""``fedfuse simulate``, ``baseline`` and ``report``: run a scenario, its centralised
reference, read a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedfuse.cli.app import app
from fedfuse.cli.common import (
    SigningKey,
    console,
    print_summary,
    reports_errors,
    setup_logging,
    signing_key_path,
    tracking_from_env,
)
from fedfuse.errors import FedfuseError


@app.command()
@reports_errors
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
    with_baseline: Annotated[bool, typer.Option(
        "--baseline", help="also train each architecture centrally on the pooled data "
                           "and record it in the summary under 'baseline'")] = False,
    signing_key: SigningKey = None,
) -> None:
    """Run a scenario on Flower's simulation engine and write a run directory."""
    from fedfuse.artifact.rundir import resumable_config
    from fedfuse.artifact.signing import signing_key as load_signing_key
    from fedfuse.config import load_config

    if (config is None) == (resume is None):
        raise FedfuseError("give a scenario file, or --resume RUN_DIR (not both)")
    if resume is not None and (set_ or rounds or out):
        raise FedfuseError("--resume continues a run with its own settings; --set, "
                           "--rounds and --out do not apply")
    overrides = [*(set_ or []), *([f"device={device}"] if device is not None else [])]
    if config is None:
        assert resume is not None
        config = resumable_config(resume)
    cfg = load_config(config, overrides=overrides, rounds=rounds)
    tracking_from_env(cfg)
    if verbose:
        cfg.simulation.verbose = True
    from fedfuse.simulation.runner import simulate as run_scenario  # imports flwr first

    setup_logging(cfg.simulation.verbose)

    signer = load_signing_key(signing_key_path(signing_key))
    summary, run_dir = run_scenario(cfg, out or resume, console, resume=resume is not None,
                                    signer=signer)
    print_summary(cfg.name, summary)
    console.print(f"wall time {summary['wall_seconds']:.1f} s; run directory: {run_dir}")
    if with_baseline:
        from fedfuse.atomic import atomic_write_json
        from fedfuse.simulation.baseline import baseline as central

        summary["baseline"] = central(cfg)
        atomic_write_json(run_dir / "summary.json", summary)
        print_baseline(summary["baseline"], summary)


@app.command("baseline")
@reports_errors
def baseline_cmd(
    config: Annotated[Path, typer.Argument(help="scenario TOML file")],
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="override any key, as for simulate (repeatable)")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="override the number of rounds")] = None,
    run: Annotated[Optional[Path], typer.Option(
        help="a finished run of this scenario, for the federated column")] = None,
    epochs: Annotated[Optional[int], typer.Option(
        help="centralised epochs [rounds × local epochs]")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="also write the results as JSON")] = None,
) -> None:
    """Train each cohort's architecture centrally on the scenario's pooled training data,
    under the same privacy setting (one DP-SGD run at the same ε), scored on the same
    test split: what federation and privacy cost."""
    import json

    from fedfuse.atomic import atomic_write_json
    from fedfuse.config import load_config
    from fedfuse.simulation.baseline import baseline as central

    cfg = load_config(config, overrides=set_, rounds=rounds)
    summary = None
    if run is not None:
        if not (run / "summary.json").is_file():
            raise FedfuseError(f"--run {run}: not a finished run (summary.json is missing)")
        summary = json.loads((run / "summary.json").read_text())
    base = central(cfg, epochs)
    print_baseline(base, summary)
    if json_out is not None:
        atomic_write_json(json_out, base)


def print_baseline(base: dict, summary: dict | None) -> None:
    """The centralised-against-federated table."""
    from rich.table import Table

    from fedfuse.simulation.baseline import comparison_rows

    one = next(iter(base["cohorts"].values()))
    spent = "" if one["epsilon"] is None else (f", ε {one['epsilon']:.2f} at δ "
                                               f"{one['delta']:g}")
    table = Table(title=f"centralised ({one['epochs']} epochs on {one['train_examples']} "
                        f"pooled records{spent}) against federated test accuracy")
    for col in ("cohort", "centralised", "federated", "federated - centralised"):
        table.add_column(col, justify="left" if col == "cohort" else "right")
    for row in comparison_rows(base, summary):
        table.add_row(*row)
    console.print(table)


@app.command()
@reports_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
) -> None:
    """Print a finished run's table: every member, every fusion method, the one served."""
    import json

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FedfuseError(f"{run_dir}: not a finished run directory (summary.json is "
                           "missing)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedfuseError(f"{summary_path}: not valid JSON ({exc})") from None
    print_summary(str(summary["scenario"]), summary)
    privacy = summary["privacy"]
    if privacy["mode"] != "off":
        console.print(f"privacy: {privacy['mode']}, max ε {privacy['max_epsilon']:.3f} at "
                      f"δ = {privacy['delta']:g}")
