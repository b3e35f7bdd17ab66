"""What every ``fedfuse`` command shares: the console, one way to report an error, the
log set-up, and the run summary table."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text

from fedfuse.errors import FedfuseError

console = Console(stderr=True)

AllowArch = Annotated[Optional[list[str]], typer.Option(
    help="a user model factory this may import, package.module:factory or "
         "package.module:* (repeat for more; the built-ins always load)")]
"""The ``--allow-arch`` option of every command that loads an artifact."""

Trust = Annotated[Optional[list[Path]], typer.Option(
    help="a signer's public key (PEM, a run's signer.pub copied out of band): only "
         "artifacts it signed are accepted (repeatable)")]
"""The ``--trust`` option of every command that loads an artifact."""

P = ParamSpec("P")
R = TypeVar("R")


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """A command whose ``FedfuseError`` is printed as one line (``error: ...``) and ends
    the process with status 2; any other exception is a bug and keeps its traceback."""
    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except FedfuseError as exc:
            console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False,
                          soft_wrap=True)
            raise typer.Exit(code=2) from None

    return run


def tracking_from_env(cfg: Any) -> None:
    """MLflow's own ``MLFLOW_TRACKING_URI`` where the scenario names no tracking URI
    (the command line is the edge that reads the environment)."""
    cfg.tracking.mlflow_uri = (cfg.tracking.mlflow_uri
                               or os.environ.get("MLFLOW_TRACKING_URI", ""))


SigningKey = Annotated[Optional[Path], typer.Option(
    help="the coordinator's Ed25519 key that signs the fused artifact (made there if "
         "absent) [$FEDFUSE_HOME/signing-key.pem, FEDFUSE_HOME defaulting to ~/.fedfuse]")]


def signing_key_path(given: Path | None) -> Path:
    """``--signing-key``, else ``$FEDFUSE_HOME/signing-key.pem`` (``~/.fedfuse``): the
    coordinator's key stays with the operator, not in any run or registry directory."""
    if given is not None:
        return given
    home = os.environ.get("FEDFUSE_HOME")
    return (Path(home) if home else Path.home() / ".fedfuse") / "signing-key.pem"


def setup_logging(verbose: bool) -> None:
    """fedfuse's log lines on the console; its dependencies' only with ``verbose``."""
    from fedfuse.compat import quiet_dependencies

    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    quiet_dependencies(verbose)


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so child Flower processes are stopped on the way out."""
    import signal

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def print_summary(name: str, summary: dict[str, Any]) -> None:
    """A finished run's table: every member, every fusion method, the one served."""
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
