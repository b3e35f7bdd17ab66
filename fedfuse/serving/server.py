"""Run the predict API under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from fedfuse.errors import FedfuseError
from fedfuse.serving.config import ServeConfig

log = logging.getLogger("fedfuse.serve")


def serve(cfg: ServeConfig, source: Path) -> None:
    """Serve ``source`` until SIGINT/SIGTERM; in-flight requests finish before exit."""
    import uvicorn

    from fedfuse.serving.app import create_app

    for key in ("tls_cert", "tls_key", "api_keys"):
        value = getattr(cfg, key)
        if value is not None and not Path(value).is_file():
            raise FedfuseError(f"serve.{key}: file not found: {value}")
    if cfg.api_keys is None and not _is_loopback(cfg.host):
        log.warning("serving on %s without API keys: anyone who reaches the port can call "
                    "/v1/ (use --api-keys)", cfg.host)
    app = create_app(cfg, source)
    uvicorn.run(app, host=cfg.host, port=cfg.port, ssl_certfile=cfg.tls_cert,
                ssl_keyfile=cfg.tls_key, access_log=False, log_level="info",
                lifespan="on", timeout_graceful_shutdown=30)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
