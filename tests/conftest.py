"""Fixtures shared by the test suite (plain helpers live in ``tests/helpers.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import SMALL_SCENARIO


@pytest.fixture(scope="session", autouse=True)
def fedfuse_home(tmp_path_factory: pytest.TempPathFactory):
    """The coordinator's signing key of every CLI the suite runs lives in a temporary
    FEDFUSE_HOME, never in the user's ~/.fedfuse."""
    home = tmp_path_factory.mktemp("fedfuse-home")
    before = os.environ.get("FEDFUSE_HOME")
    os.environ["FEDFUSE_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("FEDFUSE_HOME", None)
    else:
        os.environ["FEDFUSE_HOME"] = before


@pytest.fixture
def task_identity():
    """Messages created outside a running ServerApp need Flower's task identity."""
    from fedfuse.compat import task_identity as identity

    with identity(run_id=1, node_id=0, task_id=1):
        yield


@pytest.fixture
def scenario(tmp_path: Path):
    """Write a small scenario file (``SMALL_SCENARIO`` unless ``text`` is given)."""

    def write(text: str = "", name: str = "tiny") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(text or SMALL_SCENARIO)
        return path

    return write
