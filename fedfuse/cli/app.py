"""The ``fedfuse`` command's Typer application; each command group registers itself on
it (``fedfuse.cli.run``, ``model``, ``serve``, ``deploy``)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Private federated learning with ensemble fusion.")


@app.callback()
def _root() -> None:
    """Private federated learning with ensemble fusion."""
