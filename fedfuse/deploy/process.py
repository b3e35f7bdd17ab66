"""Flower's daemons (SuperLink, SuperNode) as child processes of a fedfuse command."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

from fedfuse.errors import FedfuseError

SCRUBBED = ("FLWR_INTERNAL_", "FORWARDED_ALLOW_IPS")
"""Variables a Flower child never inherits: Flower's internal switches (one starts an
unguarded gRPC Control API beside the SuperLink's port) and uvicorn's list of proxies
whose forwarded-for headers it believes."""


def inherited(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """``environ`` without the ``SCRUBBED`` variables."""
    return {k: v for k, v in environ.items() if not k.startswith(SCRUBBED)}


class FlowerProcess:
    """A Flower command run in its own process group, its output appended to ``log``,
    with this process's environment (less ``SCRUBBED``) and ``env``; stopped (SIGTERM,
    then SIGKILL) when the ``with`` block ends."""

    def __init__(self, argv: list[str], log: Path, flwr_home: Path,
                 env: dict[str, str] | None = None) -> None:
        # Flower's commands (and the ones they start, such as flower-superexec) are
        # taken from this interpreter's environment first, activated or not
        scripts = str(Path(sys.executable).parent)
        path = os.pathsep.join([scripts, os.environ.get("PATH", "")])
        exe = shutil.which(argv[0], path=path)
        if exe is None:
            raise FedfuseError(f"{argv[0]} is not installed; install flwr in this environment")
        self.argv = [exe, *argv[1:]]
        self.log = log
        self.env = {**inherited(os.environ), **(env or {}), "PATH": path,
                    "FLWR_HOME": str(flwr_home)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0
        """Where this process's output starts in ``log`` (earlier runs' output precedes it)."""

    def __enter__(self) -> FlowerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.offset = out.tell()
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop the process and everything it started (Flower's SuperExec, app processes)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 20) -> str:
        """The last lines this process logged, without terminal colour codes."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(self.offset)
                text = fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(strip_ansi(text).splitlines()[-lines:])


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the fedfuse process dies, even by SIGKILL, so a
    killed coordinator or site leaves no Flower daemon behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
