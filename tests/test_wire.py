"""Message fields read as the layout's types (``fedfuse.wire``): a missing or mistyped
field from another party is a WireError naming it, never a silent coercion."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedfuse import wire
from fedfuse.errors import FedfuseError
from fedfuse.wire import WireError
from tests.helpers import reply_from

pytestmark = pytest.mark.usefixtures("task_identity")


def message():
    return reply_from(3, RecordDict({
        "config": ConfigRecord({"n": 7, "flag": True, "x": 0.5, "name": "a", "raw": b"\x01",
                                "nodes": [1, 2], "names": ["a", "b"], "mixed": [1, True],
                                "seven": "7"}),
        "metrics": MetricRecord({"num-examples": 40}),
        "arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})}))


def test_fields_of_the_right_type_are_read_as_that_type():
    msg = message()
    cfg = wire.config(msg, "config")
    assert wire.as_int(cfg, "n") == 7 and wire.as_float(cfg, "n") == 7.0
    assert wire.as_float(cfg, "x") == 0.5 and wire.as_str(cfg, "name") == "a"
    assert wire.as_bytes(cfg, "raw") == b"\x01"
    assert wire.as_list(cfg, "nodes", int) == [1, 2]
    assert wire.as_list(cfg, "names", str) == ["a", "b"]
    assert wire.as_int(wire.metrics(msg), "num-examples") == 40
    np.testing.assert_array_equal(wire.as_array(wire.arrays(msg, "arrays"), "w"), [0, 1, 2])


@pytest.mark.parametrize("read, needle", [
    (lambda m: wire.as_int(wire.config(m, "config"), "seven"), "'seven' must be an integer"),
    (lambda m: wire.as_int(wire.config(m, "config"), "flag"), "'flag' must be an integer"),
    (lambda m: wire.as_float(wire.config(m, "config"), "flag"), "'flag' must be a number"),
    (lambda m: wire.as_str(wire.config(m, "config"), "n"), "'n' must be a string"),
    (lambda m: wire.as_bytes(wire.config(m, "config"), "name"), "'name' must be bytes"),
    (lambda m: wire.as_list(wire.config(m, "config"), "mixed", int), "list of int"),
    (lambda m: wire.as_list(wire.config(m, "config"), "names", int), "list of int"),
    (lambda m: wire.as_int(wire.config(m, "config"), "absent"), "no field 'absent'"),
    (lambda m: wire.config(m, "privacy"), "no 'privacy' record"),
    (lambda m: wire.metrics(m, "config"), "no 'config' record"),
    (lambda m: wire.as_array(wire.arrays(m, "arrays"), "b"), "no array 'b'"),
])
def test_a_missing_or_mistyped_field_is_a_wire_error_naming_it(read, needle):
    with pytest.raises(WireError, match=needle) as err:
        read(message())
    assert isinstance(err.value, FedfuseError)
