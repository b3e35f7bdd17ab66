"""How many exchanges a round takes, counted on the Grid the coordinator is given, in a
real Flower simulation of two cohorts side by side (issue 22): with secure aggregation
and its consistency check five in the first round (setup, share, train, check, unmask)
and three after (train, check, unmask: the next round's keys and shares ride on the
first two), two fewer without the check, one without secure aggregation; federated
evaluation rides on the train exchange, and the fusion statistics' session opens on
the last round's exchanges."""

from __future__ import annotations

import pytest

from fedfuse.config import config_from_dict
from fedfuse.secagg.messages import CARRIER
from tests.helpers import run_federation

pytestmark = pytest.mark.slow


def scenario(secure: bool, check: bool = True):
    return config_from_dict({
        "name": "count", "seed": 4, "rounds": 3,
        "cohorts": [{"arch": "logreg", "clients": 3}, {"arch": "mlp", "clients": 3}],
        "partition": {"method": "iid", "min_samples": 20},
        "secure_aggregation": {"enabled": secure, "consistency_check": check,
                               "threshold": 0.7 if check else 0.6},
    })


@pytest.mark.parametrize("check", [True, False])
def test_a_secure_round_is_three_exchanges_after_the_first_and_fusion_rides_along(check):
    counter = run_federation(scenario(secure=True, check=check))
    rounds = counter.per_round()
    first, *steady, fusion = rounds
    signing = [{CARRIER}] if check else []
    assert [len(r) for r in rounds] == [4 + check, 2 + check, 2 + check, 2 + check]
    assert [set(x) for x in first] == [{CARRIER}, {CARRIER}, {"train"}, *signing, {CARRIER}]
    for exchanges in steady:  # train (evaluation folded in), [check,] then unmask
        assert [set(x) for x in exchanges] == [{"train"}, *signing, {CARRIER}]
        assert all(len(x) == 6 for x in exchanges)
    assert [set(x) for x in fusion] == [{"query.fusion"}, *signing, {CARRIER}]
    result = counter.result
    assert result.secure_sums == 6 and result.fusion.sites == 6
    for record in result.history:
        for entry in record.cohorts.values():
            assert entry.secagg_clients == 3 and entry.val_accuracy is not None


def test_a_plaintext_round_is_one_exchange():
    counter = run_federation(scenario(secure=False))
    rounds = counter.per_round()
    assert [[set(x) for x in r] for r in rounds[:-1]] == [[{"train"}]] * 3
    assert [set(x) for x in rounds[-1]] == [{"query.fusion"}]
