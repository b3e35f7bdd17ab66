"""Run the predict API under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path

from fedfuse.errors import FedfuseError
from fedfuse.serving.config import ServeConfig
from fedfuse.serving.workers import Shared, serve_workers

log = logging.getLogger("fedfuse.serve")


def serve(cfg: ServeConfig, source: Path) -> None:
    """Serve ``source`` until SIGINT/SIGTERM; in-flight requests finish before exit."""
    for key in ("tls_cert", "tls_key", "api_keys"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_file():
            raise FedfuseError(f"serve.{key}: file not found: {value}")
    if cfg.api_keys is None and not _is_loopback(cfg.host):
        log.warning("serving on %s without API keys: anyone who reaches the port can call "
                    "/v1/ (use --api-keys)", cfg.host)
    if cfg.workers > 1:
        serve_workers(cfg, source)
        return
    code = run_app(cfg, source, Shared.made(cfg))
    if code:
        raise SystemExit(code)


def run_app(cfg: ServeConfig, source: Path, shared: Shared,
            sockets: list[socket.socket] | None = None) -> int:
    """Run the app under uvicorn on ``cfg``'s address (or ``sockets``) until told to
    stop: 0, or 3 when it failed to start (uvicorn's code)."""
    import uvicorn

    from fedfuse.serving.app import create_app

    server = uvicorn.Server(uvicorn.Config(
        create_app(cfg, source, shared), host=cfg.host, port=cfg.port,
        ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key, access_log=False,
        log_level="info", lifespan="on", timeout_graceful_shutdown=30))
    server.run(sockets=sockets)
    return 0 if server.started else 3


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
