"""Architectures registered by installed distributions under the
``fedfuse.architectures`` entry points: a cohort names one by its short name, which
becomes the registered import path when the scenario loads, so the allow-lists apply."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedfuse.config import config_from_dict
from fedfuse.config.preflight import check_models
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models.factory import CodeNotAllowed, code_identity, factory_of
from fedfuse.models.registry import build_model
from fedfuse.models.spec import CodeAllowance

PACKAGE = '''
from torch import nn


def tiny(schema, hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, hidden), nn.Tanh(),
                         nn.Linear(hidden, schema.num_classes))
'''

ENTRY_POINTS = """[fedfuse.architectures]
tiny-mlp = archpkg.models:tiny
broken = archpkg.models:holder.tiny
"""


@pytest.fixture
def installed(tmp_path: Path, monkeypatch):
    """A distribution ``archpkg-dist 1.3`` installed on a directory of the Python path."""
    (tmp_path / "archpkg").mkdir()
    (tmp_path / "archpkg" / "__init__.py").write_text("")
    (tmp_path / "archpkg" / "models.py").write_text(PACKAGE)
    info = tmp_path / "archpkg_dist-1.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: archpkg-dist\nVersion: 1.3\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (info / "top_level.txt").write_text("archpkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("archpkg", "archpkg.models"):
        sys.modules.pop(name, None)


def scenario(arch: str, **cohort) -> dict:
    return {"name": "t", "privacy": {"mode": "sample", "target_epsilon": 8.0},
            "cohorts": [{"arch": arch, "clients": 3, **cohort},
                        {"arch": "logreg", "clients": 3}]}


def test_a_registered_name_becomes_its_import_path_and_trains(installed):
    cfg = config_from_dict(scenario("tiny-mlp", params={"hidden": 8}))
    cohort = cfg.cohorts[0]
    assert (cohort.arch, cohort.name) == ("archpkg.models:tiny", "tiny-mlp")
    schema = load_dataset(cfg.data).schema
    check_models(cfg, schema)
    model = build_model(cohort.model, schema, code=cfg.own_code)
    assert sum(p.numel() for p in model.parameters()) == 64 * 8 + 8 + 8 * 10 + 10
    assert code_identity(cohort.model)["distribution"] == "archpkg-dist==1.3"
    named = config_from_dict(scenario("tiny-mlp", name="mine"))
    assert named.cohorts[0].name == "mine"


def test_a_site_that_does_not_allow_the_registered_path_refuses_it_unimported(installed):
    cfg = config_from_dict(scenario("tiny-mlp"))
    with pytest.raises(CodeNotAllowed, match="'archpkg.models:tiny' is not allowed"):
        factory_of(cfg.cohorts[0].model, CodeAllowance((), how="allow it"))
    assert "archpkg.models" not in sys.modules
    factory_of(cfg.cohorts[0].model, CodeAllowance(("archpkg.models:*",)))
    assert "archpkg.models" in sys.modules


def test_an_entry_point_that_is_not_a_factory_path_is_refused(installed):
    with pytest.raises(ConfigError) as err:
        config_from_dict(scenario("broken"))
    assert err.value.key == "cohorts[0].arch"
    assert "the entry point 'broken' of 'fedfuse.architectures' names " \
           "'archpkg.models:holder.tiny'" in err.value.message


def test_an_unregistered_name_says_where_it_was_looked_for(installed):
    with pytest.raises(ConfigError) as err:
        config_from_dict(scenario("tiny_mlp"))
    assert err.value.key == "cohorts[0].arch"
    assert "registers under the 'fedfuse.architectures' entry points" in err.value.message
