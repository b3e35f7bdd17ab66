from pathlib import Path

import pytest

from fedfuse.config import apply_override, config_from_dict, load_config
from fedfuse.errors import ConfigError
from tests.helpers import ROOT

BASE = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 3}]}


def build(**changes):
    raw = {**BASE, **changes}
    return config_from_dict(raw)


def test_default_scenario_loads_with_typed_values():
    cfg = load_config(ROOT / "simulations" / "digits.toml")
    assert cfg.num_clients >= 10
    assert len(cfg.cohorts) >= 3
    assert cfg.partition.method == "dirichlet" and cfg.partition.alpha <= 0.5
    assert isinstance(cfg.partition.alpha, float)


def test_defaults_fill_missing_tables():
    cfg = build()
    assert cfg.rounds == 20 and cfg.data.source == "digits" and cfg.privacy.mode == "off"
    plain = cfg.train.resolved(private=False)
    assert (plain.batch_size, plain.local_epochs, plain.momentum) == (16, 2, 0.9)


def test_train_defaults_follow_privacy_but_explicit_values_win():
    dp = build().train.resolved(private=True)
    assert (dp.batch_size, dp.local_epochs, dp.momentum) == (32, 1, 0.0)
    cfg = build(train={"batch_size": 8, "momentum": 0.5})
    assert cfg.train.resolved(private=True).batch_size == 8
    assert cfg.train.resolved(private=True).momentum == 0.5
    assert cfg.train.resolved(private=True, examples=6000).batch_size == 8


def test_the_dp_batch_follows_the_sites_size():
    """clamp(2^round(log2(n / 10)), 32, 256): the default scenario's sites keep 32."""
    from fedfuse.config.train import dp_batch_size

    assert [dp_batch_size(n) for n in (44, 108, 187, 450, 600, 1300, 6500, 10**6)] == \
        [32, 32, 32, 32, 64, 128, 256, 256]
    assert build().train.resolved(private=True, examples=600).batch_size == 64
    assert build().train.resolved(private=False, examples=600).batch_size == 16


@pytest.mark.parametrize("raw, key", [
    ({"bogus": 1}, "bogus"),
    ({"partition": {"alpah": 0.3}}, "partition.alpah"),
    ({"cohorts": [{"arch": "mlp", "clients": 2, "lrr": 0.1}]}, "cohorts[0].lrr"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ConfigError) as err:
        build(**raw)
    assert err.value.key == key
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize("raw, key", [
    ({"rounds": "ten"}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"partition": {"alpha": "high"}}, "partition.alpha"),
    ({"simulation": {"verbose": 1}}, "simulation.verbose"),
    ({"cohorts": [{"arch": "mlp", "clients": True}]}, "cohorts[0].clients"),
    ({"train": 3}, "train"),
])
def test_wrong_type_is_named(raw, key):
    with pytest.raises(ConfigError) as err:
        build(**raw)
    assert err.value.key == key


@pytest.mark.parametrize("raw, key", [
    ({"rounds": 0}, "rounds"),
    ({"partition": {"alpha": 0.0}}, "partition.alpha"),
    ({"partition": {"method": "zipf"}}, "partition.method"),
    ({"data": {"test_fraction": 1.0}}, "data.test_fraction"),
    ({"cohorts": [{"arch": "mlp", "clients": 0}]}, "cohorts[0].clients"),
    ({"cohorts": []}, "cohorts"),
    ({"cohorts": [{"arch": "mlp", "clients": 3}, {"arch": "mlp", "clients": 3}]},
     "cohorts[1].name"),
    ({"simulation": {"cpus_per_client": 4.0}}, "simulation.cpus_per_client"),
])
def test_impossible_value_is_named(raw, key):
    with pytest.raises(ConfigError) as err:
        build(**raw)
    assert err.value.key == key


def test_missing_required_key():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"name": "t"})
    assert err.value.key == "cohorts" and "required" in str(err.value)


def test_overrides_parse_toml_values_and_index_lists(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[[cohorts]]\narch = "mlp"\nclients = 3\n')
    cfg = load_config(path, ["partition.alpha=0.1", "cohorts.0.clients=5", "data.source=x.csv",
                             "partition.method=iid"], rounds=4)
    assert cfg.partition.alpha == 0.1 and cfg.cohorts[0].clients == 5 and cfg.rounds == 4
    assert cfg.partition.method == "iid"
    assert cfg.data.source == str((Path.cwd() / "x.csv").resolve())


def test_override_errors_name_the_key():
    raw = {**BASE}
    with pytest.raises(ConfigError, match="cohorts.3"):
        apply_override(raw, "cohorts.3.clients=1")
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(raw, "rounds")
    raw = {**BASE, "rounds": 3}
    with pytest.raises(ConfigError, match="rounds"):
        apply_override(raw, "rounds.x=1")


def test_malformed_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(ROOT / "simulations" / "digits.toml")
    path = tmp_path / "again.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("value", [0.0, -0.1, 2.0])
def test_bad_pickup_interval_is_refused(value):
    with pytest.raises(ConfigError) as err:
        build(simulation={"pickup_interval": value})
    assert err.value.key == "simulation.pickup_interval"
