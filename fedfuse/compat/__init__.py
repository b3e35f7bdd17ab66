"""Every use of Flower beyond its public surface, in one place.

fedfuse otherwise uses only ``flwr.app``, ``flwr.serverapp`` (and its strategies),
``flwr.clientapp`` and ``flwr.simulation``. What lives here reaches into Flower's
internals, and was written against, and tested with, the versions in
:data:`TESTED_FLOWER` (``tests/test_compat.py`` fails when any of it moves):

- the simulation engine's message pickup loop (``vce_api.add_messages_to_queue``), run
  with a shorter wait (``fedfuse.simulation.engine``);
- ``flwr.simulation.run_simulation``, public but deprecated since 1.41 (its banner is
  filtered out; docs/architecture.md says what moving to ``flwr run`` would take);
- ``flower-superlink``'s own argument parsing, app and lifespan, so the SuperLink can be
  served behind fedfuse's guard (``fedfuse.deploy.superlink``);
- the SuperLink's Control API client and its protobuf messages, and the FAB builder
  (``fedfuse.deploy.coordinator``);
- ``flower-supernode`` with the hard-coded waits of its main loop capped
  (``fedfuse.deploy.supernode``), and the SuperNode's Runtime API used as SuperExec
  and ``flwr-clientapp`` use it, by one long-lived executor (``fedfuse.deploy.warm``);
- Flower's telemetry switch, already read if Flower was imported before fedfuse;
- messages created outside a running app (tests).

The package's modules hold one side each (``simulation``, ``superlink``, ``supernode``);
every name is importable from ``fedfuse.compat``. Importing it imports neither Flower
nor torch: it checks Flower's installed version, and turns Flower's telemetry off (see
:func:`no_phoning_home`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

TESTED_FLOWER = ("1.41",)
"""The Flower minor versions this module was written against and tested with."""

FLOWER_VERSION = version("flwr")
if not FLOWER_VERSION.startswith(tuple(f"{v}." for v in TESTED_FLOWER)):
    raise ImportError(f"fedfuse uses Flower internals tested with flwr "
                      f"{', '.join(TESTED_FLOWER)}.x only; this environment has flwr "
                      f"{FLOWER_VERSION}: install 'flwr>=1.41,<1.42' (fedfuse/compat/ "
                      "lists what would need checking)")


def no_phoning_home() -> None:
    """Flower's telemetry and update check off (``fedfuse.NO_PHONING_HOME``), also when
    Flower was imported before fedfuse and has read its telemetry switch already."""
    from fedfuse import NO_PHONING_HOME

    os.environ.update(NO_PHONING_HOME)
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:
        telemetry.__dict__["FLWR_TELEMETRY_ENABLED"] = "0"  # read at each event


no_phoning_home()


OBJECT_PULL_BACKOFF = (0.01, 0.25)
"""First and largest wait (s) between tries to pull a message's objects that are not
there yet; Flower's defaults are 1 s and 10 s (``PULL_INITIAL_BACKOFF``, ``_CAP``)."""


def fast_object_pulls(module: Any, name: str, **limits: float) -> None:
    """``module.name`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``
    as a module imported it) retrying after ``OBJECT_PULL_BACKOFF`` instead: a message's
    objects arrive within milliseconds of it, and Flower's first retry waits a second.
    ``limits``: further keyword arguments, such as ``max_time``."""
    import functools

    original = getattr(module, name)
    first, cap = OBJECT_PULL_BACKOFF
    setattr(module, name, functools.partial(getattr(original, "func", original),
                                            initial_backoff=first, backoff_cap=cap, **limits))


def fast_grid_pulls() -> None:
    """The ServerApp process's SuperLink Grid pulls replies' objects without Flower's
    1 s first backoff (``fedfuse.deploy.apps``)."""
    from flwr.superlink.grid import http_grid

    fast_object_pulls(http_grid, "pull_objects")


# -- messages outside a running app ---------------------------------------------------


@contextmanager
def task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> Iterator[None]:
    """Flower's task identity set as a running app's would be, so that messages can be
    created and replied to outside one (tests, tools)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# -- quiet dependencies -----------------------------------------------------------------


def quiet_dependencies(verbose: bool) -> None:
    """What fedfuse's commands print is fedfuse's: unless ``verbose``, Flower logs only
    warnings, and the INFO lines of alembic (Flower's state store) and Ray's
    accelerator ``FutureWarning`` are left out."""
    import warnings

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Flower API call
    flower = logging.getLogger("flwr")  # has its own console handler
    flower.propagate = False
    flower.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray",
                                category=FutureWarning)


from fedfuse.compat.simulation import message_pickup, run_simulation  # noqa: E402
from fedfuse.compat.superlink import ControlClient, build_fab, serve_superlink  # noqa: E402
from fedfuse.compat.supernode import (  # noqa: E402
    RuntimeTasks,
    TaskIO,
    context_bytes,
    context_from_bytes,
    error_reply,
    serve_supernode,
)

__all__ = ["FLOWER_VERSION", "OBJECT_PULL_BACKOFF", "TESTED_FLOWER", "ControlClient",
           "RuntimeTasks", "TaskIO", "build_fab", "context_bytes", "context_from_bytes",
           "error_reply", "fast_grid_pulls", "fast_object_pulls", "message_pickup",
           "no_phoning_home", "quiet_dependencies", "run_simulation", "serve_superlink",
           "serve_supernode", "task_identity"]
