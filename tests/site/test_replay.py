"""A site's replay store: a repeated DP request answered without a second charge."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedfuse.site.replay import ReplayStore, request_key


def test_replay_store_keys_on_the_whole_request_and_keeps_the_newest(tmp_path: Path):
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    config = ConfigRecord({"server-round": 3, "lr": 0.5, "seed": 11})
    key = request_key(arrays, config)
    reshaped = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(3, 2))})
    assert request_key(reshaped, config) != key  # same bytes, another shape
    assert key == request_key(ArrayRecord({"w": Array(np.arange(6, dtype=np.float32)
                                                      .reshape(2, 3))}), config)
    other_round = ConfigRecord({"server-round": 4, "lr": 0.5, "seed": 11})
    nudged = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3) + 1e-7)})
    assert len({key, request_key(arrays, other_round), request_key(nudged, config)}) == 3

    store = ReplayStore(tmp_path / "replay", keep=2)
    assert store.load(key) is None
    store.save(key, {"w": torch.ones(2, 3)}, {"loss": 0.5, "accuracy": 0.75,
                                              "num_examples": 40})
    state, metrics = store.load(key)
    assert torch.equal(state["w"], torch.ones(2, 3))
    assert metrics == {"loss": 0.5, "accuracy": 0.75, "num_examples": 40}
    for i in range(3):
        time.sleep(0.01)
        store.save(f"k{i}", {"w": torch.zeros(1)}, {})
    assert sorted(p.stem for p in (tmp_path / "replay").iterdir()) == ["k1", "k2"]
    (tmp_path / "replay" / "k2.safetensors").write_bytes(b"\x00garbage")
    assert store.load("k2") is None  # unreadable: the site trains (and is charged) again
    entry = tmp_path / "replay" / "k1.safetensors"
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x40  # a flipped bit in the tensor bytes still parses
    entry.write_bytes(bytes(data))
    assert store.load("k1") is None  # but its SHA-256 no longer matches
