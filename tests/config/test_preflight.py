"""Pre-flight checks (``fedfuse.config.preflight.check_scenario``): what is refused once
the data are known, before any Flower process starts."""

import pytest

from fedfuse.config import load_config
from fedfuse.config.preflight import check_scenario
from fedfuse.data.sites import plan_federation
from fedfuse.errors import ConfigError, DataError
from tests.helpers import ROOT


def test_delta_not_below_one_over_n_is_refused_before_the_run():
    cfg = load_config(ROOT / "simulations" / "digits.toml",
                      ["privacy.delta=0.05", "privacy.mode=\"sample\"",
                       "privacy.target_epsilon=8.0"])
    plan = plan_federation(cfg)
    sizes = [len(c.train) for c in plan.federation.clients]
    assert 0.05 >= 1 / min(sizes)
    with pytest.raises(ConfigError) as err:
        check_scenario(cfg, plan.dataset.schema, plan.test, sizes)
    assert err.value.key == "privacy.delta" and str(min(sizes)) in str(err.value)
    # a deployment does not know the sites' sizes: the sites check δ themselves
    check_scenario(cfg, plan.dataset.schema, plan.test)


def test_an_architecture_that_cannot_take_the_data_is_refused_with_its_key(scenario):
    """The split itself does not look at the models (``plan_federation``); the pre-flight
    check names the cohort whose architecture cannot take the schema's input."""
    cfg = load_config(scenario(), ["data.source=\"breast_cancer\""])
    plan = plan_federation(cfg)
    sizes = [len(c.train) for c in plan.federation.clients]
    with pytest.raises(ConfigError, match="needs image-shaped input") as err:
        check_scenario(cfg, plan.dataset.schema, plan.test, sizes)
    assert err.value.key == "cohorts[0].arch"
    ok = load_config(scenario(), ["data.source=\"breast_cancer\"",
                                  "cohorts=[{arch='mlp', clients=3}, {arch='logreg', clients=3}]"])
    plan = plan_federation(ok)
    check_scenario(ok, plan.dataset.schema, plan.test,
                   [len(c.train) for c in plan.federation.clients])


def test_a_distillation_share_the_held_out_data_cannot_give_is_refused(scenario):
    cfg = load_config(scenario(), ["fusion.unlabeled_fraction=0.999"])
    plan = plan_federation(cfg)
    with pytest.raises(DataError, match="for transfer"):
        check_scenario(cfg, plan.dataset.schema, plan.test)
