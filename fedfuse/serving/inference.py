"""One forward pass on a served version, shared by the ``/v1`` API and the Open Inference
Protocol: which version answers, the batcher's refusals, and the answer's figures. Each
API renders a :class:`ServeError` in its own error format."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedfuse.serving.batcher import BatcherClosed, BatcherFull
from fedfuse.serving.registry import ModelRegistry, ModelSlot

log = logging.getLogger("fedfuse.serve")


@dataclass
class ServeError(Exception):
    """A request the server cannot answer: HTTP ``status``, an error ``kind`` and a
    ``message`` naming the problem (plus response ``headers``, e.g. Retry-After)."""

    status: int
    kind: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    details: list[dict[str, str]] = field(default_factory=list)
    """Every offending place (up to 20), each with its message, for an invalid body."""
    field: str | None = None
    """The offending place of the request (``instances[3][0][5]``), when one is."""


def float32_instances(values: object, name: str) -> np.ndarray:
    """``values`` (already checked to be numbers) as float32; a value beyond float32's
    range (finite in JSON, infinite once cast) raises ServeError naming its place in
    ``name``."""
    with np.errstate(over="ignore"):
        x = np.array(values, dtype=np.float32)  # a copy: frombuffer views are read-only
    finite = np.isfinite(x)
    if not finite.all():
        where = name + "".join(f"[{int(i)}]" for i in np.argwhere(~finite)[0])
        raise ServeError(422, "invalid_input", f"{where}: a number beyond float32's range "
                         f"(|x| <= {float(np.finfo(np.float32).max):.4g})", field=where)
    return x


Observer = Callable[[ModelSlot, np.ndarray, np.ndarray], None]
"""Told of every answered request: (version's slot, inputs, probabilities)."""


async def answer(registry: ModelRegistry, version: str, x: np.ndarray, max_queue: int,
                 observe: Observer) -> tuple[ModelSlot, np.ndarray]:
    """:func:`run_model`'s checked answer, told to ``observe`` (quality monitoring)."""
    slot, proba = await run_model(registry, version, x, max_queue)
    proba = checked_probabilities(slot, proba)
    observe(slot, x, proba)
    return slot, proba


async def run_model(registry: ModelRegistry, version: str, x: np.ndarray,
                    max_queue: int) -> tuple[ModelSlot, np.ndarray]:
    """The version that answered (``version``, or the latest when empty) and its class
    probabilities for ``x``; raises ServeError when no version can answer."""
    slot = registry.get(version) if version else registry.latest
    if slot is None:
        raise ServeError(404, "not_found", f"no model version {version!r} is being served")\
            if version else ServeError(503, "unavailable", "no model is loaded yet")
    try:
        try:
            return slot, await slot.batcher.submit(x)
        except BatcherClosed:  # unloaded between lookup and submit: take the new one
            again = registry.get(version) if version else registry.latest
            if again is None or again is slot:
                raise ServeError(503, "unavailable",
                                 "the model version is being unloaded") from None
            return again, await again.batcher.submit(x)
    except BatcherFull:
        raise ServeError(503, "overloaded", f"{max_queue} requests are already waiting for "
                         "the model (serve.max_queue); retry in 1 s",
                         {"retry-after": "1"}) from None


def checked_probabilities(slot: ModelSlot, proba: np.ndarray) -> np.ndarray:
    """``proba``, or ServeError 500 when the model made a non-finite value (an answer
    never carries NaN: JSON has none)."""
    if not np.isfinite(proba).all():
        log.error("model version %s gave non-finite probabilities", slot.version)
        raise ServeError(500, "model_error", "the model gave non-finite probabilities")
    return proba
