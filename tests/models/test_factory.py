"""User architectures (``fedfuse.models.factory``): a cohort's ``arch`` as
``module:factory`` with ``params``, every refusal checked up front with the cohort key
named, the fixer, parameters of the built-ins, and code that runs only where allowed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fedfuse.config import config_from_dict
from fedfuse.config.preflight import check_models
from fedfuse.data.datasets import load_dataset
from fedfuse.errors import ConfigError
from fedfuse.models.factory import CodeNotAllowed, code_identity
from fedfuse.models.registry import build_model, count_parameters, readout, zero_readout
from fedfuse.models.spec import CodeAllowance, ModelSpec

USER_MODULE = '''
from torch import nn


def tiny_cnn(schema, channels=4):
    c, h, w = schema.input_shape
    return nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(2, channels),
                         nn.Tanh(), nn.Flatten(), nn.Linear(channels * h * w,
                                                            schema.num_classes))


def pooled(schema):
    """No linear layer: a 1x1 convolution to the classes, averaged over the image."""
    return nn.Sequential(nn.Conv2d(schema.input_shape[0], schema.num_classes, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def with_batchnorm(schema):
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, 16),
                         nn.BatchNorm1d(16), nn.Linear(16, schema.num_classes))


def three_outputs(schema):
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, 3))


def wrong_input(schema):
    return nn.Linear(7, schema.num_classes)


def no_schema():
    return nn.Linear(1, 1)


def not_a_module(schema):
    return 42


def raises(schema):
    raise ValueError("this factory needs colour images")


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_dir(tmp_path: Path):
    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    (tmp_path / "explodes.py").write_text("raise RuntimeError('boom at import')\n")
    marker = tmp_path / "imported.txt"
    (tmp_path / "sideeffect.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from torch import nn\n\ndef model(schema):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, "
        "schema.num_classes))\n")
    yield tmp_path
    for name in ("usermodels", "explodes", "sideeffect"):
        sys.modules.pop(name, None)


def scenario(user_dir: Path, arch: str, **cohort) -> dict:
    return {"name": "t", "code_dir": str(user_dir), "privacy": {"mode": "sample", "target_epsilon": 8.0},
            "cohorts": [{"arch": arch, "clients": 3, **cohort},
                        {"arch": "logreg", "clients": 3}]}


def refusal(user_dir: Path, arch: str, **cohort) -> ConfigError:
    cfg = config_from_dict(scenario(user_dir, arch, **cohort))
    with pytest.raises(ConfigError) as err:
        check_models(cfg, load_dataset(cfg.data).schema)
    return err.value


@pytest.mark.parametrize(("arch", "cohort", "key", "needle"), [
    ("nowhere:model", {}, "cohorts[0].arch", "cannot import module 'nowhere'"),
    ("explodes:model", {}, "cohorts[0].arch",
     "importing module 'explodes' failed: RuntimeError: boom at import"),
    ("usermodels:missing", {}, "cohorts[0].arch", "module 'usermodels' has no 'missing'"),
    ("usermodels:NOT_CALLABLE", {}, "cohorts[0].arch", "is a int, not a callable factory"),
    ("usermodels:no_schema", {}, "cohorts[0].params", "cannot be called as factory(schema"),
    ("usermodels:tiny_cnn", {"params": {"width": 3}}, "cohorts[0].params",
     "unexpected keyword argument 'width'"),
    ("usermodels:raises", {}, "cohorts[0].arch",
     "failed to build a model for input (1, 8, 8) and 10 classes: ValueError: this factory "
     "needs colour images"),
    ("usermodels:not_a_module", {}, "cohorts[0].arch", "returned a int, not a torch.nn.Module"),
    ("usermodels:wrong_input", {}, "cohorts[0].arch", "fails on a dummy batch of shape "
     "(2, 1, 8, 8)"),
    ("usermodels:three_outputs", {}, "cohorts[0].arch", "maps a batch of shape (2, 1, 8, 8) "
     "to (2, 3); it must output (2, 10) logits"),
    ("usermodels:with_batchnorm", {}, "cohorts[0].arch", "uses BatchNorm, which DP-SGD cannot "
     "train"),
])
def test_each_bad_user_factory_is_refused_naming_the_cohort_key(user_dir, arch, cohort, key,
                                                                needle):
    err = refusal(user_dir, arch, **cohort)
    assert err.key == key
    assert needle in err.message, err.message


def test_an_invalid_reference_is_refused_when_the_scenario_loads(user_dir):
    with pytest.raises(ConfigError) as err:
        config_from_dict(scenario(user_dir, "usermodels.tiny_cnn"))
    assert err.value.key == "cohorts[0].arch"
    assert "nor an import path of the form 'package.module:factory'" in err.value.message


def test_batchnorm_names_the_fix_and_fix_true_applies_opacus_fixer(user_dir, caplog):
    assert "cohorts[0].fix = true" in refusal(user_dir, "usermodels:with_batchnorm").message
    cfg = config_from_dict(scenario(user_dir, "usermodels:with_batchnorm", fix=True))
    schema = load_dataset(cfg.data).schema
    check_models(cfg, schema)  # passes now
    model = build_model(cfg.cohorts[0].model, schema, code=cfg.own_code)
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm1d not in kinds
    assert "ModuleValidator.fix replaced" in caplog.text
    # without DP, BatchNorm is allowed as it is
    plain = config_from_dict({**scenario(user_dir, "usermodels:with_batchnorm"),
                              "privacy": {"mode": "off"}})
    check_models(plain, schema)


def test_a_user_factory_with_params_builds_and_keeps_its_own_initialisation(user_dir):
    cfg = config_from_dict(scenario(user_dir, "usermodels:tiny_cnn", params={"channels": 6}))
    assert cfg.cohorts[0].name == "tiny_cnn"
    schema = load_dataset(cfg.data).schema
    check_models(cfg, schema)
    model = build_model(cfg.cohorts[0].model, schema, seed=1, code=cfg.own_code)
    assert model(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    assert model[1][0].out_channels == 6
    assert float(readout(model).weight.abs().sum()) > 0  # not zeroed: the user's init
    again = build_model(cfg.cohorts[0].model, schema, seed=1, code=cfg.own_code)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    identity = code_identity(cfg.cohorts[0].model)
    import hashlib
    assert identity["module_sha256"] == hashlib.sha256(
        (user_dir / "usermodels.py").read_bytes()).hexdigest()


def test_a_model_without_a_linear_layer_is_handled(user_dir):
    cfg = config_from_dict(scenario(user_dir, "usermodels:pooled"))
    schema = load_dataset(cfg.data).schema
    check_models(cfg, schema)
    model = build_model(cfg.cohorts[0].model, schema, code=cfg.own_code)
    assert readout(model) is None
    zero_readout(model)  # nothing to zero, no error
    assert model(torch.ones(3, 1, 8, 8)).shape == (3, 10)


def test_code_not_allowed_is_refused_before_it_is_imported(user_dir):
    schema = load_dataset(config_from_dict(scenario(user_dir, "mlp")).data).schema
    spec = ModelSpec("sideeffect:model")
    site = CodeAllowance(("usermodels:tiny_cnn",), how="allow it with --allow-arch",
                         search=str(user_dir))
    with pytest.raises(CodeNotAllowed, match="'sideeffect:model' is not allowed to run here"):
        build_model(spec, schema, code=site)
    assert not (user_dir / "imported.txt").exists()  # its module never ran
    assert "sideeffect" not in sys.modules
    build_model(spec, schema, code=CodeAllowance(("sideeffect:*",), search=str(user_dir)))
    assert (user_dir / "imported.txt").read_text() == "ran"
    # built-ins run under any allowance
    build_model(ModelSpec("mlp"), schema, code=CodeAllowance(()))


def test_two_cohorts_of_one_architecture_need_names_of_their_own(user_dir):
    raw = {"name": "t", "cohorts": [{"arch": "mlp", "clients": 3},
                                    {"arch": "mlp", "clients": 3, "params": {"hidden": 64}}]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert err.value.key == "cohorts[1].name" and "give each a name" in err.value.message
    raw["cohorts"][1]["name"] = "wide"
    cfg = config_from_dict(raw)
    assert [c.name for c in cfg.cohorts] == ["mlp", "wide"]


def test_builtins_take_params_and_refuse_ones_they_lack():
    schema = load_dataset(config_from_dict({"name": "t", "cohorts": [
        {"arch": "mlp", "clients": 3}]}).data).schema
    deep = build_model(ModelSpec("mlp", {"hidden": [64, 32]}), schema)
    assert count_parameters(deep) == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    cnn = build_model(ModelSpec("cnn", {"channels": [16, 32], "groups": 4, "scattering": 0}),
                      schema)
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert sum(isinstance(m, nn.GroupNorm) for m in cnn.modules()) == 2
    assert float(readout(cnn).weight.abs().sum()) == 0.0  # built-ins start at zero
    with pytest.raises(ConfigError, match="unexpected keyword argument 'hidden'"):
        build_model(ModelSpec("logreg", {"hidden": 3}), schema)
    with pytest.raises(ConfigError, match="groups = 3 does not divide 16 channels"):
        build_model(ModelSpec("cnn", {"channels": 16, "groups": 3}), schema)


def test_builtins_size_themselves_from_the_schema_and_artifacts_record_it(tmp_path):
    """``cnn`` on 28x28 images gets a scattering front end of 2 scales and one block of
    16 channels; on 8x8 digits 1 scale and a linear read-out; below 8 pixels one block
    of 8, as before; a cohort's own params go on top. The manifest writes the resolved
    params out, so the artifact loads the same model whatever later defaults become."""
    import json

    import numpy as np

    from fedfuse.artifact.manifest import EnsembleMember, write_artifact
    from fedfuse.artifact.predictor import FusedPredictor
    from fedfuse.data.datasets import DataSchema
    from fedfuse.models.registry import fitted_params, resolved

    big = DataSchema((1, 28, 28), tuple(f"p{i}" for i in range(784)),
                     tuple(str(i) for i in range(10)))
    small = load_dataset(config_from_dict({"name": "t", "cohorts": [
        {"arch": "mlp", "clients": 3}]}).data).schema
    assert fitted_params("cnn", big) == {"scattering": 2, "channels": [16]}
    tiny = DataSchema((1, 4, 4), tuple(f"p{i}" for i in range(16)),
                      tuple(str(i) for i in range(10)))
    assert fitted_params("cnn", small) == {"scattering": 1, "channels": []}
    assert fitted_params("cnn", tiny) == {} and fitted_params("mlp", small) == {}
    assert fitted_params("mlp", big) == fitted_params("logreg", big) == {"scattering": 2}
    model = build_model("cnn", big)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16]
    assert readout(model).in_features == 16 * 3 * 3
    own = ModelSpec("cnn", {"channels": 4})
    assert resolved(own, big).params == {"scattering": 2, "channels": 4}
    assert [m.out_channels for m in build_model(own, big).modules()
            if isinstance(m, nn.Conv2d)] == [4]
    write_artifact(tmp_path / "model",
                   members=[EnsembleMember("cnn", ModelSpec("cnn"), model.state_dict(), 3,
                                           None)],
                   weights=np.ones(1), method="soft_vote", schema=big,
                   fusion_fit={"objective": "brier"},
                   privacy={"mode": "off", "max_epsilon": None, "delta": None},
                   fused_test_accuracy=None)
    entry = json.loads((tmp_path / "model" / "manifest.json").read_text())["members"][0]
    assert entry["model"] == {"arch": "cnn", "params": {"scattering": 2, "channels": [16]},
                              "fix": False, "code": {}}
    X = np.random.default_rng(0).uniform(size=(3, 1, 28, 28)).astype(np.float32)
    assert FusedPredictor.load(tmp_path / "model").predict_proba(X).shape == (3, 10)


@pytest.mark.parametrize("made_by", ["before user factories", "before scattering"])
def test_an_artifact_from_before_fitted_builtins_still_loads(tmp_path, made_by):
    """A manifest without member ``model`` records (fedfuse before issue 24) built its
    ``cnn`` with one block of 8 channels on any image size; one that records
    ``{channels = [16, 32]}`` without ``scattering`` (before the scattering front end)
    built two plain blocks. Each loads as what it was made with, not as today's fitted
    default."""
    import json

    import numpy as np

    from fedfuse.artifact.manifest import (
        EnsembleMember,
        canonical_json,
        content_hash,
        write_artifact,
    )
    from fedfuse.artifact.predictor import FusedPredictor
    from fedfuse.data.datasets import DataSchema

    big = DataSchema((1, 28, 28), tuple(f"p{i}" for i in range(784)),
                     tuple(str(i) for i in range(10)))
    params = ({"channels": 8} if made_by == "before user factories"
              else {"channels": [16, 32]})
    spec = ModelSpec("cnn", {"scattering": 0, **params})
    old = build_model(spec, big, seed=1)
    for p in old.parameters():
        torch.nn.init.normal_(p, std=0.1)
    write_artifact(tmp_path / "model",
                   members=[EnsembleMember("cnn", spec, old.state_dict(), 3, None)],
                   weights=np.ones(1), method="soft_vote", schema=big,
                   fusion_fit={"objective": "brier"},
                   privacy={"mode": "off", "max_epsilon": None, "delta": None},
                   fused_test_accuracy=None)
    path = tmp_path / "model" / "manifest.json"
    manifest = json.loads(path.read_text())
    if made_by == "before user factories":
        del manifest["members"][0]["model"]  # as the old format wrote it
    else:
        del manifest["members"][0]["model"]["params"]["scattering"]
    manifest["content_sha256"] = content_hash(manifest)
    manifest["model_version"] = f"1.0.0+{manifest['content_sha256'][:12]}"
    path.write_bytes(canonical_json(manifest))
    X = np.random.default_rng(0).uniform(size=(2, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(old(torch.as_tensor(X)), 1).numpy()
    np.testing.assert_allclose(FusedPredictor.load(tmp_path / "model").predict_proba(X), want,
                               atol=1e-6)
