import pytest

from fedfuse.simulation.engine import pickup_interval


def test_pickup_interval_shrinks_for_small_federations_only():
    assert pickup_interval(10) == pytest.approx(0.005)
    assert pickup_interval(100) == pytest.approx(0.05)
    assert pickup_interval(200) == pickup_interval(5000) == pytest.approx(0.1)
    assert pickup_interval(10, configured=0.3) == 0.3

