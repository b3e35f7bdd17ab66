"""The predict API server's settings: a ``[serve]`` table, or ``fedfuse serve``'s options."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfuse.config.loading import build
from fedfuse.config.sections import check
from fedfuse.errors import ConfigError
from fedfuse.models.device import check_device_name


@dataclass
class ServeConfig:
    """The predict API server (``fedfuse serve``; a ``[serve]`` table, or CLI options)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: str | None = None
    """Keys file from ``fedfuse keys create``; without one, ``/v1/`` is open to anyone
    who can reach the port."""
    tls_cert: str | None = None
    """PEM certificate (chain) for HTTPS; needs ``tls_key``."""
    tls_key: str | None = None
    max_instances: int = 256
    """Most instances one request may carry."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_batch_size: int = 256
    """Most rows coalesced into one forward pass."""
    max_queue: int = 1024
    """Most requests waiting for a forward pass at once; one more gets 503 with
    ``Retry-After``, so a flood is refused fast instead of growing the queue."""
    max_wait_ms: float = 0.0
    """How long a forming batch waits for more requests; 0 batches whatever queued up
    while the previous batch ran, adding no delay at low load."""
    rate_limit: str | None = None
    """Per API key (without keys, per IPv4 address or IPv6 /64), e.g. ``"100/second"``,
    ``"5000/minute"``; none by default."""
    reload_interval: float = 2.0
    """Seconds between rescans of the model directory and keys file; 0 turns it off."""
    threads: int = 1
    """torch threads for the forward pass (per worker)."""
    workers: int = 1
    """Server processes sharing the port (and the per-caller rate limits, and the
    metrics); each loads the models, so memory grows with them."""
    device: str = "cpu"
    """Where the forward pass runs: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``."""
    grpc_port: int | None = None
    """Where the Open Inference Protocol's gRPC service listens (same host, keys and TLS
    certificate as HTTP); none: gRPC is off."""
    model_name: str = "fedfuse"
    """The model's name in the Open Inference Protocol (``/v2/models/{name}``)."""
    trust: list[str] = field(default_factory=list)
    """Public keys (PEM files: a run's ``signer.pub``, copied out of band) of which one
    must have signed every artifact served; an unsigned or otherwise signed one is
    refused. None given: artifacts are checked by their hashes only."""
    allow_arch: list[str] = field(default_factory=list)
    """User model factories the server may import to load an artifact's members
    (``package.module:factory`` or ``package.module:*``), from the current directory or
    the Python path; the built-ins always load."""

    def __post_init__(self) -> None:
        check_device_name(self.device, "device")
        check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        check(self.grpc_port is None or (1 <= self.grpc_port <= 65535
                                         and self.grpc_port != self.port), "grpc_port",
              f"must be in 1..65535 and not the HTTP port, got {self.grpc_port}")
        check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.model_name) is not None,
              "model_name", f"{self.model_name!r} is not a name of letters, digits, '_', "
              "'.' and '-' (at most 64)")
        check(self.workers == 1 or self.port != 0, "workers",
              "more than one worker needs a fixed port, not port 0")
        check((self.tls_cert is None) == (self.tls_key is None), "tls_key",
               "tls_cert and tls_key go together: give both for HTTPS, or neither")
        for key in ("max_instances", "max_body_bytes", "max_batch_size", "max_queue",
                    "threads", "workers"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("max_wait_ms", "reload_interval"):
            value = getattr(self, key)
            check(math.isfinite(value) and value >= 0.0, key,
                   f"must be a finite number >= 0, got {value}")
        if self.rate_limit is not None:
            from limits import parse

            try:
                parse(self.rate_limit)
            except ValueError:
                raise ConfigError("rate_limit", f"{self.rate_limit!r} is not a rate such as "
                                  "'100/second' or '5000/minute'") from None


def serve_config(path: Path | None, options: dict[str, Any]) -> ServeConfig:
    """The ``[serve]`` table of ``path`` (if given) with ``options`` (set CLI values) on
    top, validated; relative file paths are taken from the current directory."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = dict(tomllib.loads(path.read_text(encoding="utf-8")).get("serve", {}))
        except FileNotFoundError:
            raise ConfigError(None, f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(None, f"malformed TOML in {path}: {exc}") from None
    raw.update({k: v for k, v in options.items() if v is not None})
    return build(ServeConfig, raw, "serve")
