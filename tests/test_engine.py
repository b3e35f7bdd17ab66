import pytest
from flwr.server.superlink.fleet.vce import vce_api

from fedfuse.simulation.engine import message_pickup, pickup_interval


def test_pickup_interval_shrinks_for_small_federations_only():
    assert pickup_interval(10) == pytest.approx(0.005)
    assert pickup_interval(100) == pytest.approx(0.05)
    assert pickup_interval(200) == pickup_interval(5000) == pytest.approx(0.1)
    assert pickup_interval(10, configured=0.3) == 0.3


def test_message_pickup_swaps_flowers_loop_in_and_back_out():
    flower_loop = vce_api.add_messages_to_queue
    with pytest.raises(RuntimeError, match="boom"):
        with message_pickup(0.01):
            assert vce_api.add_messages_to_queue is not flower_loop
            raise RuntimeError("boom")
    assert vce_api.add_messages_to_queue is flower_loop
