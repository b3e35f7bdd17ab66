"""The ``fedfuse`` command."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

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
    console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
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


def main() -> None:
    app()
