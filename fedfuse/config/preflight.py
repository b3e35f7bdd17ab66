"""Pre-flight checks: what can be refused before a run starts, once the data are known.

The scenario's own values are checked when it is loaded (``fedfuse.config.sections`` and
``scenario``); these checks need the data set's schema, the sites' training sizes or the
models, so they run after the data are loaded and before any Flower process starts,
in simulation (``fedfuse.simulation.runner``) and deployment (``fedfuse.deploy.coordinator``)
alike.
"""

from __future__ import annotations

from fedfuse.config.scenario import FedfuseConfig
from fedfuse.data.datasets import DataSchema, Dataset, split_transfer
from fedfuse.errors import ConfigError


def check_models(cfg: FedfuseConfig, schema: DataSchema) -> None:
    """Build every cohort's model once and refuse, naming ``cohorts[i].arch``: a
    built-in that cannot take the schema's input, a user factory that does not import,
    does not take ``(schema, **params)``, fails on a dummy batch or does not output
    ``(batch, num_classes)``, and under record-level DP a model DP-SGD cannot train."""
    from fedfuse.models.factory import check_body
    from fedfuse.models.registry import build_model, check_compatible

    for i, cohort in enumerate(cfg.cohorts):
        key = f"cohorts[{i}].arch"
        check_compatible(cohort.model, schema, key=key)
        model = build_model(cohort.model, schema, code=cfg.own_code, key=key)
        check_body(model[1], cohort.model, schema, key, private=cfg.privacy.mode == "sample")


def check_tracking(cfg: FedfuseConfig) -> None:
    """Refuse tracking to MLflow where MLflow is not installed."""
    import importlib.util

    if cfg.tracking.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.mlflow_uri", "tracking needs MLflow, which is not "
                          "installed: pip install 'fedfuse[tracking]'")


def check_scenario(cfg: FedfuseConfig, schema: DataSchema, held_out: Dataset,
                   train_sizes: list[int] | None = None) -> None:
    """Refuse settings that cannot run on these data: an architecture that cannot take
    the schema's input, a distillation share the held-out data cannot give, and with
    record-level DP a δ not below 1/n for some site's ``n`` training records (known in
    simulation only) or a model DP-SGD cannot train; with secure aggregation, a ring
    too small for the summed example counts."""
    cfg.data.by_channel(schema.is_image)
    check_tracking(cfg)
    check_models(cfg, schema)
    split_transfer(held_out, cfg.fusion.unlabeled_fraction, cfg.seed)
    if cfg.secure_aggregation.enabled and train_sizes:
        from fedfuse.secagg.encoding import check_ring

        check_ring(cfg.secure_aggregation.quantization_bits, sum(train_sizes))
    p = cfg.privacy
    if p.mode != "sample":
        return
    if train_sizes and p.delta is not None and p.delta >= 1.0 / min(train_sizes):
        smallest = min(train_sizes)
        raise ConfigError("privacy.delta", f"must be below 1/n for every client; the "
                          f"smallest client has n = {smallest} training records, so δ must "
                          f"be < {1.0 / smallest:.3g} (got {p.delta:g}); leave it unset "
                          "for the default 1/(10·n) rule")
