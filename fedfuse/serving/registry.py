"""The model versions a server holds, and how new ones go live.

``source`` is either one artifact directory (it has a ``manifest.json``) or a registry:
a directory whose subdirectories are artifacts. Every artifact is verified on load
(``FusedPredictor.load``). The *latest* version (highest semver, then newest creation
time) answers ``/v1/predict``; every loaded version answers
``/v1/models/{version}/predict``.

``refresh()`` rescans the source. A new or changed artifact is loaded and verified off
the event loop, then published by swapping one dict, so requests already holding the old
version finish on it. A version whose directory disappears stops taking requests, drains
its queue, and is dropped. An artifact that fails verification is logged once and skipped
until its manifest changes; if it replaced a loaded version in place, that version keeps
serving from memory. A half-written one (no manifest yet) is simply not there yet.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedfuse.artifact.manifest import MANIFEST
from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.errors import FedfuseError
from fedfuse.serving.batcher import BatchObserver, MicroBatcher

log = logging.getLogger("fedfuse.serve")


class RegistryError(FedfuseError):
    """The model source holds no loadable artifact, or its versions do not fit together."""


@dataclass
class ModelSlot:
    """One loaded version and the batcher in front of it."""

    predictor: FusedPredictor
    batcher: MicroBatcher
    directory: Path
    stamp: float
    """The manifest's mtime when loaded: a changed stamp means a changed artifact."""

    @property
    def version(self) -> str:
        return self.predictor.version


def semver_key(version: str) -> tuple[int, ...]:
    """Order key of ``MAJOR.MINOR.PATCH[-pre][+build]``: numeric parts compared as numbers;
    a pre-release sorts below its release, as semver says."""
    core = re.match(r"^(\d+)\.(\d+)\.(\d+)(-[^+]*)?", version)
    if core is None:
        return (-1,)
    return (*map(int, core.groups()[:3]), 0 if core.group(4) else 1)


def artifact_dirs(source: Path) -> list[Path]:
    """``source`` itself when it is an artifact, else its artifact subdirectories."""
    if (source / MANIFEST).is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


class ModelRegistry:
    """Loaded versions by version string, with the latest one designated."""

    def __init__(self, source: Path, *, max_batch_size: int, max_wait: float,
                 max_queue: int, executor: Executor, observe: BatchObserver | None = None,
                 device: torch.device | None = None, allow_arch: tuple[str, ...] = (),
                 search: str | None = None,
                 trust: tuple[Ed25519PublicKey, ...] | None = None) -> None:
        if not source.is_dir():
            raise RegistryError(f"{source}: not a directory (expected an artifact such as "
                                "RUN_DIR/model, or a directory of artifacts)")
        self.source = source
        self._batch: dict[str, Any] = {"max_batch_size": max_batch_size, "max_wait": max_wait,
                                       "max_queue": max_queue}
        self._executor = executor
        self._observe = observe
        self._device = device if device is not None else torch.device("cpu")
        self._code = (allow_arch, search, trust)
        """``FusedPredictor.load``'s user model code the server imports, where it looks
        first, and the keys one of which must have signed every version."""
        self._slots: dict[str, ModelSlot] = {}
        self._latest: ModelSlot | None = None
        self._failed: dict[Path, float] = {}
        self._lock = asyncio.Lock()

    @property
    def latest(self) -> ModelSlot | None:
        return self._latest

    @property
    def slots(self) -> list[ModelSlot]:
        """Every loaded version, in semver order."""
        return sorted(self._slots.values(), key=lambda s: semver_key(s.version))

    def get(self, version: str) -> ModelSlot | None:
        """The slot of ``version``, or of the only loaded version it is a prefix of
        (``1.2.0`` finds ``1.2.0+<hash>``)."""
        if version in self._slots:
            return self._slots[version]
        matches = [s for v, s in self._slots.items() if v.split("+")[0] == version]
        return matches[0] if len(matches) == 1 else None

    async def refresh(self) -> list[str]:
        """Rescan the source; returns the versions that went live."""
        async with self._lock:
            return await self._refresh()

    async def _refresh(self) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            found = {d: (d / MANIFEST).stat().st_mtime for d in artifact_dirs(self.source)}
        except OSError as exc:  # the directory moved or a manifest vanished mid-scan
            log.error("cannot scan %s (%s); serving as before", self.source, exc)
            return []
        current = {s.directory: s for s in self._slots.values()}
        slots = {v: s for v, s in self._slots.items()
                 if s.directory in found and found[s.directory] == s.stamp}
        added = []
        for directory, stamp in found.items():
            old = current.get(directory)
            if old is not None and old.stamp == stamp:
                continue
            if self._failed.get(directory) == stamp:
                _keep(slots, old)
                continue
            try:
                predictor = await loop.run_in_executor(self._executor, FusedPredictor.load,
                                                       directory, self._device, *self._code)
                self._check_fits(predictor, slots)
            except (FedfuseError, OSError) as exc:  # ArtifactError, RegistryError, user code
                self._failed[directory] = stamp
                kept = f"; still serving version {old.version} loaded from it before" \
                    if old is not None else ""
                log.error("not serving %s: %s%s", directory, exc, kept)
                _keep(slots, old)
                continue
            self._failed.pop(directory, None)
            if predictor.version in slots:
                log.warning("%s holds version %s, already served from %s; skipped",
                            directory, predictor.version, slots[predictor.version].directory)
                continue
            batcher = MicroBatcher(_forward(predictor), executor=self._executor,
                                   observe=self._observe, **self._batch)
            batcher.start()
            slots[predictor.version] = ModelSlot(predictor, batcher, directory, stamp)
            added.append(predictor.version)
            log.info("serving model version %s from %s", predictor.version, directory)
        gone = [s for v, s in self._slots.items() if slots.get(v) is not s]
        self._slots = slots
        self._latest = max(slots.values(), default=None, key=lambda s: (
            semver_key(s.version), s.predictor.manifest.get("created_at", "")))
        for slot in gone:  # unpublished above; in-flight requests finish, then it goes
            await slot.batcher.stop()
            log.info("unloaded model version %s", slot.version)
        return added

    def _check_fits(self, predictor: FusedPredictor, slots: dict[str, ModelSlot]) -> None:
        """All versions of one registry take the same input (they share one request
        schema), so comparing with any one of them suffices."""
        slot = next(iter(slots.values()), None)
        if slot is None:
            return
        a, b = slot.predictor.schema, predictor.schema
        if (a.input_shape, a.dtype) != (b.input_shape, b.dtype):
            raise RegistryError(f"its input shape {list(b.input_shape)} differs from "
                                f"version {slot.version}'s {list(a.input_shape)}; serve "
                                "models of another input from another registry")

    async def close(self) -> None:
        async with self._lock:
            slots, self._slots, self._latest = list(self._slots.values()), {}, None
            for slot in slots:
                await slot.batcher.stop()


def _keep(slots: dict[str, ModelSlot], old: ModelSlot | None) -> None:
    """Keep serving ``old`` (from memory) when its directory changed into something that
    does not load: a bad update in place never takes the good version down."""
    if old is not None:
        slots.setdefault(old.version, old)


def _forward(predictor: FusedPredictor) -> Callable[[np.ndarray], np.ndarray]:
    """The probabilities of an already-validated float32 batch."""
    import torch

    model = predictor.model

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run
