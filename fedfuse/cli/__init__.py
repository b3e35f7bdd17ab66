"""The ``fedfuse`` command: one module per command group, every error reported the same
way (``fedfuse.cli.common.reports_errors``)."""

# isort: skip_file
# Each module registers its commands on import; the import order is the order of --help.
from fedfuse.cli import run  # noqa: F401
from fedfuse.cli import model  # noqa: F401
from fedfuse.cli import serve  # noqa: F401
from fedfuse.cli import deploy  # noqa: F401
from fedfuse.cli.app import app


def main() -> None:
    app()
