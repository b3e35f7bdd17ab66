"""Reading Flower messages as the types fedfuse's message layout gives their fields.

Every message a party receives was written by another party, which may be broken or
dishonest. A record or field that is missing, or of another type than the layout says
(``fedfuse.site.app`` documents it), raises :class:`WireError` naming it, instead of a
``TypeError`` deep inside a handler, or a silent coercion (``int("7")``, ``float(True)``).
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedfuse.errors import FedfuseError

T = TypeVar("T")

VALIDATION = "validation"
"""A train reply's MetricRecord of the site's validation figures for the model it
received ({num-examples, val-loss, val-accuracy}; num-examples: validation examples)."""
VALIDATE = "validate"
"""The train config's flag asking the site to score the received model before training."""
POLICY_REFUSAL = "refused by the site's policy"
"""How the error of a message a site's policy refused begins its reason
(``fedfuse.site.policy.PolicyRefusal``; logged by the coordinator with the rule)."""


class WireError(FedfuseError):
    """A message lacks a record or field, or holds one of the wrong type."""


def config(msg: Message, name: str) -> ConfigRecord:
    """The message's ConfigRecord ``name``."""
    return _record(msg.content.config_records, name)


def arrays(msg: Message, name: str) -> ArrayRecord:
    """The message's ArrayRecord ``name``."""
    return _record(msg.content.array_records, name)


def metrics(msg: Message, name: str = "metrics") -> MetricRecord:
    """The message's MetricRecord ``name``."""
    return _record(msg.content.metric_records, name)


def _record(records: Any, name: str) -> Any:
    if name not in records:
        raise WireError(f"the message has no {name!r} record of the expected kind")
    return records[name]


def as_int(record: ConfigRecord | MetricRecord, key: str) -> int:
    """An integer field (a boolean is not one)."""
    value = _field(record, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError(f"field {key!r} must be an integer, got {type(value).__name__}")
    return value


def as_float(record: ConfigRecord | MetricRecord, key: str) -> float:
    """A number field (integer or float, not a boolean), as a float."""
    value = _field(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"field {key!r} must be a number, got {type(value).__name__}")
    return float(value)


def as_str(record: ConfigRecord, key: str) -> str:
    return _typed(record, key, str, "a string")


def as_bytes(record: ConfigRecord, key: str) -> bytes:
    return _typed(record, key, bytes, "bytes")


def as_list(record: ConfigRecord | MetricRecord, key: str, item: type[T]) -> list[T]:
    """A list field whose every entry is an ``item`` (a boolean is no integer)."""
    value = _field(record, key)
    if not isinstance(value, list) or not all(
            isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value):
        raise WireError(f"field {key!r} must be a list of {item.__name__}")
    return value


def as_array(record: ArrayRecord, key: str) -> np.ndarray:
    """An array of an ArrayRecord, as numpy."""
    if key not in record:
        raise WireError(f"the record has no array {key!r}")
    return record[key].numpy()


def _field(record: ConfigRecord | MetricRecord, key: str) -> Any:
    if key not in record:
        raise WireError(f"the record has no field {key!r}")
    return record[key]


def _typed(record: ConfigRecord, key: str, kind: type[T], what: str) -> T:
    value = _field(record, key)
    if not isinstance(value, kind):
        raise WireError(f"field {key!r} must be {what}, got {type(value).__name__}")
    return value
