"""A warm site: ``fedfuse site`` itself executes its SuperNode's ClientApp tasks.

Flower's SuperNode (``--isolation subprocess``) starts one ``flwr-clientapp`` process per
message: about 3 s here with fedfuse's imports, several times per round. With
``--isolation process`` the SuperNode leaves its tasks to an executor authenticated by a
shared secret (SuperExec's role). :class:`WarmSite` is that executor, in the long-lived
``fedfuse site`` process that keeps the site's data, models and imports loaded: it claims
each task, pulls its message and the run's context, runs the fedfuse ClientApp in
process, stores the context, pushes the reply and ends the task, as
``flwr-clientapp`` does for one message (``fedfuse.compat.RuntimeTasks``).

The run's context (the node's state across messages: secure-aggregation keys, in
simulation the ledger) is kept here between tasks and written to
``<state>/runs/<run id>.context`` (0600, atomically) before each reply is pushed, so
a reply never leaves the site ahead of the state it depends on, and a restarted site
continues with its state. The privacy ledger keeps its own files and guarantees
(``fedfuse.privacy.ledger``, ``fedfuse.site.replay``).

Only fedfuse's own installed ClientApp ever runs: a task whose FAB names other
components is answered with an error, and no code from a FAB is loaded.
"""

from __future__ import annotations

import io
import logging
import time
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedfuse.atomic import atomic_write_bytes
from fedfuse.compat import RuntimeTasks, context_bytes, context_from_bytes, error_reply
from fedfuse.errors import FedfuseError

log = logging.getLogger("fedfuse.site")

COMPONENTS = {"serverapp": "fedfuse.deploy.apps:server_app",
              "clientapp": "fedfuse.deploy.apps:client_app"}
"""What a fedfuse FAB names (``fedfuse.deploy.coordinator.fab_bytes``)."""

FAST_POLL = 0.01
IDLE_POLL = 0.2
"""Seconds between task polls: FAST_POLL right after a task (the next message of a
round follows soon), doubling while idle up to IDLE_POLL."""


def fab_components(fab: bytes) -> dict[str, str]:
    """The ``[tool.flwr.app.components]`` a FAB's pyproject.toml names (empty if none)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            project = tomllib.loads(bundle.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    found = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


class RunContexts:
    """Each run's Context across its tasks: in memory, and on disk under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.live: dict[int, Context] = {}

    def path(self, run_id: int) -> Path:
        return self.directory / f"{run_id}.context"

    def resume(self, pulled: Context) -> Context:
        """The run's context: the one kept here; else ``pulled`` (the SuperNode's copy)
        with the state this site last stored for the run, if any."""
        run = pulled.run_id
        if run not in self.live:
            path = self.path(run)
            if path.is_file():
                pulled.state = context_from_bytes(path.read_bytes()).state
            self.live[run] = pulled
        return self.live[run]

    def store(self, context: Context) -> None:
        """Write the run's context atomically (mkstemp: readable by this user only) and
        durably (fsynced with its directory) before the reply goes out: a context rolled
        back by a power cut would let a coordinator ask again for what the site already
        answered (an unmask with another survivor list reveals both b and s of a peer; a
        second masked vector under the same masks reveals a difference of updates)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path(context.run_id), context_bytes(context))


class WarmSite:
    """Executes ``app`` for every ClientApp task of the SuperNode at ``runtime``."""

    def __init__(self, app: ClientApp, runtime: RuntimeTasks, state: Path) -> None:
        self.app = app
        self.runtime = runtime
        self.contexts = RunContexts(state / "runs")

    def serve(self, alive: Callable[[], bool]) -> None:
        """Poll for tasks and execute them while ``alive()``; the Runtime API not
        answering yet (the SuperNode starting) is waited out, and a task that cannot be
        completed (its message's objects never arrive, the coordinator went away while
        the reply was pushed) is given up with a warning: the coordinator counts it as
        unanswered, and the site takes the next one."""
        delay = FAST_POLL
        while alive():
            try:
                token = self.runtime.acquire()
            except Exception as exc:  # transport errors while the SuperNode starts/stops
                log.debug("runtime API not answering: %s", exc)
                token = None
            if token is None:
                time.sleep(delay)
                delay = min(2 * delay, IDLE_POLL)
                continue
            try:
                self.execute(token)
            except Exception as exc:  # transport and object-store errors of one task
                log.warning("a task was given up: %s", str(exc).splitlines()[0][:300])
            delay = FAST_POLL

    def execute(self, token: str) -> None:
        """One task: pull, run the ClientApp in process, store the context, reply, end;
        logged (DEBUG) with the time to pull it (waiting for its content to arrive), to
        run the app and store the context (work), and to push the reply and end it."""
        start = time.perf_counter()
        with self.runtime.task(token) as task:
            message, pulled, fab = task.pull()
            began = time.perf_counter()
            context = self.contexts.resume(pulled)
            reply, failure = self.answer(message, context, fab)
            self.contexts.store(context)
            done = time.perf_counter()
            task.push(reply, context)
            task.finish(context, failure)
        log.debug("task %s: pull %.4f s, work %.4f s, reply %.4f s",
                  message.metadata.message_type, began - start, done - began,
                  time.perf_counter() - done)

    def answer(self, message: Message, context: Context, fab: bytes
               ) -> tuple[Message, str | None]:
        """The app's reply, or an error reply (and why) if the FAB is not fedfuse's or
        the app raised."""
        try:
            found = fab_components(fab)
            if found != COMPONENTS:
                raise FedfuseError(f"this site runs fedfuse's own ClientApp only; the run's "
                                   f"app bundle names {found or 'no components'}")
            return self.app(message=message, context=context), None
        except Exception as exc:  # the reply carries it, as flwr-clientapp's would
            log.error("%s message failed: %s", message.metadata.message_type, exc,
                      exc_info=not isinstance(exc, FedfuseError))
            return error_reply(message, exc), str(exc)

