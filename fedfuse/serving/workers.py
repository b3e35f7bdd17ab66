"""``fedfuse serve --workers N``: N worker processes answering on one port.

This process, the supervisor, checks that the ports are free, makes what the workers
share (the rate limiter's table; a directory for Prometheus's multiprocess mode, so a
scrape of any worker sums every worker's series), then forks the workers. Each builds
the app and listens on the HTTP port with ``SO_REUSEPORT``, so the kernel spreads the
connections over them by address hash; gRPC shares its port the same way (gRPC sets
``SO_REUSEPORT`` itself). Workers run in a process group of their own, so a terminal's
Ctrl-C reaches only the supervisor, which stops each worker once, gracefully (in-flight
requests finish), on SIGTERM or SIGINT. A worker that dies is started again, unless it
died within :data:`RESTART_GRACE` seconds of its start: one that cannot start would
not start the next time either, so the server stops and exits with an error.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from fedfuse.errors import FedfuseError
from fedfuse.serving.config import ServeConfig
from fedfuse.serving.ratelimit import RateLimiter

log = logging.getLogger("fedfuse.serve")

RESTART_GRACE = 10.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Shared:
    """What the workers of one server share: the per-caller rate limits and, with more
    than one worker, the directory of Prometheus's multiprocess files."""

    limiter: RateLimiter | None
    metrics_dir: str | None = None

    @classmethod
    def made(cls, cfg: ServeConfig, metrics_dir: str | None = None) -> Shared:
        """What ``cfg`` asks to share (a limiter when it sets ``rate_limit``)."""
        return cls(RateLimiter(cfg.rate_limit) if cfg.rate_limit else None, metrics_dir)


def listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEPORT`` when asked); a port in use
    raises FedfuseError naming it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise FedfuseError(f"serve: cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def serve_workers(cfg: ServeConfig, source: Path) -> None:
    """Serve ``source`` with ``cfg.workers`` processes until SIGINT/SIGTERM."""
    for port in (cfg.port, cfg.grpc_port):
        if port is not None:  # a plain bind fails if anyone listens, SO_REUSEPORT or not
            listen_socket(cfg.host, port, reuse_port=False).close()
    if "prometheus_client" in sys.modules:
        raise FedfuseError("serve --workers must start before prometheus_client is "
                           "imported (it fixes its multiprocess mode at import)")
    with tempfile.TemporaryDirectory(prefix="fedfuse-metrics-") as metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        from fedfuse.artifact.signing import trusted_keys
        from fedfuse.serving.app import serving_schema

        # an artifact that cannot be served fails here, once, not in every worker
        serving_schema(source, trusted_keys(cfg.trust) if cfg.trust else None)
        stopped_by = Supervisor(cfg, source, Shared.made(cfg, metrics_dir)).run()
    # exit by the signal, as one uvicorn process does, so a supervisor of ours sees a
    # requested stop (status 130 or 143); the metrics directory is gone by now
    signal.signal(stopped_by, signal.SIG_DFL)
    os.kill(os.getpid(), stopped_by)


def _end_with(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when ``supervisor`` dies (even by
    SIGKILL), so no worker outlives it holding the port (Linux's PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        log.warning("worker %d will not stop with its supervisor: prctl failed (%s)",
                    os.getpid(), os.strerror(ctypes.get_errno()))
    if os.getppid() != supervisor:  # it died before the request took hold
        os._exit(1)


class Supervisor:
    """Starts, restarts and stops the worker processes."""

    def __init__(self, cfg: ServeConfig, source: Path, shared: Shared) -> None:
        self.cfg, self.source, self.shared = cfg, source, shared
        self.workers: dict[int, tuple[int, float]] = {}
        """pid -> (worker index, start time)"""
        self.stopping: int | None = None
        """The signal that stops the server (SIGTERM when a worker failed)."""
        self.failed: str | None = None

    def run(self) -> int:
        """Serve until a signal stops every worker: that signal (raises FedfuseError
        when a worker could not start)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        for index in range(self.cfg.workers):
            self._start(index)
        log.info("serving on http://%s:%d with %d workers", self.cfg.host, self.cfg.port,
                 self.cfg.workers)
        while self.workers:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index, started = self.workers.pop(pid, (-1, 0.0))
            if index < 0 or self.stopping:
                continue
            code = os.waitstatus_to_exitcode(status)
            if time.monotonic() - started < RESTART_GRACE:
                self.failed = (f"serve: worker {index} exited ({code}) within "
                               f"{RESTART_GRACE:g} s of its start (see its log above)")
                self._stop()
            else:
                log.warning("worker %d (pid %d) exited (%d); starting it again", index, pid,
                            code)
                self._start(index)
        if self.failed:
            raise FedfuseError(self.failed)
        return self.stopping or signal.SIGTERM

    def _stop(self, signum: int = signal.SIGTERM, _: FrameType | None = None) -> None:
        if not self.stopping:
            self.stopping = signum
            for pid in self.workers:
                os.kill(pid, signal.SIGTERM)

    def _start(self, index: int) -> None:
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            _end_with(supervisor)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os._exit(self._work(index))
        self.workers[pid] = (index, time.monotonic())
        log.info("worker %d started (pid %d)", index, pid)

    def _work(self, index: int) -> int:
        """The worker's life: its exit code."""
        from fedfuse.serving.server import run_app

        try:
            sock = listen_socket(self.cfg.host, self.cfg.port, reuse_port=True)
            return run_app(self.cfg, self.source, self.shared, sockets=[sock])
        except BaseException:  # the worker's own end: log it, never unwind the fork
            log.exception("worker %d failed", index)
            return 1
