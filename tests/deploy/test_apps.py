"""Deployment pieces that need no network: a deployed site's view of its data, the
cohorts' site lists, and a deployed run's test split (discovery against registered site
names: tests/coordinator/test_discovery.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedfuse.config import config_from_dict
from fedfuse.deploy.apps import deployed_site, run_config
from fedfuse.errors import DataError, FedfuseError

RAW = {"name": "t", "rounds": 1, "data": {"source": "digits"},
       "cohorts": [{"arch": "logreg", "sites": ["a", "b", "c"]}],
       "deployment": {"wait_for_sites": 0.0}}


def context(tmp_path: Path, name: str, data: Path, labels: list[str]) -> Context:
    cfg = config_from_dict(json.loads(json.dumps(RAW)))
    rc = run_config(cfg, tuple(labels), tmp_path / "run", {1: "a", 2: "b"})
    return Context(run_id=1, node_id=1, state=RecordDict(), run_config=rc,
                   node_config={"name": name, "data": str(data),
                                "state-dir": str(tmp_path / f"state-{name}")})


def test_a_deployed_site_encodes_labels_as_the_coordinator_does(tmp_path: Path):
    X = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "a.npz", X=X, y=np.array(["7", "3"] * 20))  # only two classes here
    labels = [str(i) for i in range(10)]
    site = deployed_site(context(tmp_path, "a", tmp_path / "a.npz", labels))
    assert site.arch == "logreg" and site.index == 0
    assert site.train.schema.class_labels == tuple(labels)
    assert set(np.concatenate([site.train.y, site.val.y]).tolist()) == {3, 7}
    assert len(site.train) + len(site.val) == 40 and len(site.val) == 8
    assert (tmp_path / "state-a" / "site-secret").stat().st_mode & 0o777 == 0o600
    # the same split after a restart (the secret persists)
    from fedfuse.deploy import apps

    apps._SITES.clear()
    again = deployed_site(context(tmp_path, "a", tmp_path / "a.npz", labels))
    assert np.array_equal(again.val.X, site.val.X)


def test_a_deployed_site_refuses_unknown_labels_and_unlisted_names(tmp_path: Path):
    X = np.zeros((30, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "a.npz", X=X, y=np.array(["1", "cat"] * 15))
    with pytest.raises(DataError, match="'cat' are not among the federation's classes"):
        deployed_site(context(tmp_path, "a", tmp_path / "a.npz", ["0", "1"]))
    with pytest.raises(FedfuseError, match="site 'zz' is not listed"):
        deployed_site(context(tmp_path, "zz", tmp_path / "a.npz", ["0", "1"]))


def test_cohort_sites_are_validated():
    from fedfuse.errors import ConfigError

    bad = json.loads(json.dumps(RAW))
    bad["cohorts"] = [{"arch": "logreg", "sites": ["a", "a"]}]
    with pytest.raises(ConfigError, match="cohorts\\[0\\].sites: lists a site twice"):
        config_from_dict(bad)
    bad["cohorts"] = [{"arch": "logreg", "sites": ["a", "b"]},
                      {"arch": "mlp", "sites": ["b", "c"]}]
    with pytest.raises(ConfigError, match="site 'b' is listed in two cohorts"):
        config_from_dict(bad)
    bad["cohorts"] = [{"arch": "logreg", "sites": ["a", "b"], "clients": 3}]
    with pytest.raises(ConfigError, match="clients: is 3 but sites lists 2"):
        config_from_dict(bad)
    bad["cohorts"] = [{"arch": "logreg", "sites": ["../x", "b"]}]
    with pytest.raises(ConfigError, match="not a valid site name"):
        config_from_dict(bad)


@pytest.mark.parametrize("fraction,expected", [(0.0, 40), (0.25, 30)])
def test_a_deployed_runs_test_split_is_the_coordinators_whole_file(tmp_path: Path,
                                                                   fraction, expected):
    """`fedfuse fuse` and `query --run` rescore a deployed run on the data its coordinator
    held (less the transfer inputs), not on a simulated partition of that file."""
    from fedfuse.data.sites import run_test_split

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "test.npz", X=rng.normal(size=(40, 5)).astype(np.float32),
             y=np.arange(40) % 3)
    cfg = config_from_dict({"name": "deployed", "data": {"source": str(tmp_path / "test.npz")},
                            "cohorts": [{"arch": "logreg", "sites": ["a", "b", "c"]}],
                            "fusion": {"unlabeled_fraction": fraction}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    (run / "summary.json").write_text(json.dumps({"deployment": True}))
    assert len(run_test_split(run)) == expected
    (run / "summary.json").write_text(json.dumps({"deployment": False}))
    assert len(run_test_split(run)) < expected  # a simulation holds out only a share


SIDE_EFFECT = """open({marker!r}, "w").write("ran")
from torch import nn


def model(schema):
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, schema.num_classes))
"""


def test_a_deployed_site_imports_only_the_model_code_it_allows(tmp_path: Path):
    """A coordinator's scenario naming user code makes a site run it; the site refuses
    an import path its operator did not allow before importing it, and imports an
    allowed one from its own environment only, never from the scenario's code_dir."""
    import sys

    from fedfuse.deploy import apps
    from fedfuse.site.app import build_client_app
    from tests.helpers import incoming

    marker = tmp_path / "imported.txt"
    code = tmp_path / "coordinator-code"
    code.mkdir()
    (code / "evil.py").write_text(SIDE_EFFECT.format(marker=str(marker)))
    np.savez(tmp_path / "a.npz", X=np.zeros((30, 1, 8, 8), dtype=np.float32),
             y=np.array([str(i % 10) for i in range(30)]))
    raw = {**json.loads(json.dumps(RAW)), "code_dir": str(code),
           "cohorts": [{"arch": "evil:model", "sites": ["a", "b", "c"]}]}
    labels = tuple(str(i) for i in range(10))

    def discovery(allow: str) -> str:
        apps._SITES.clear()
        rc = run_config(config_from_dict(raw), labels, tmp_path / "run", {1: "a"})
        ctx = Context(run_id=1, node_id=1, state=RecordDict(), run_config=rc,
                      node_config={"name": "a", "data": str(tmp_path / "a.npz"),
                                   "state-dir": str(tmp_path / "state-a"),
                                   "allow-arch": allow})
        with pytest.raises(FedfuseError) as err:  # Flower replies with it as the error
            build_client_app(deployed_site)(incoming(RecordDict(), "query"), ctx)
        return str(err.value)

    assert "'evil:model' is not allowed to run here" in discovery("")
    assert "fedfuse site --allow-arch" in discovery("other:model")
    # allowed, but not installed at the site: the coordinator's code_dir is not searched
    assert "cannot import module 'evil'" in discovery("evil:model")
    assert not marker.exists() and "evil" not in sys.modules
