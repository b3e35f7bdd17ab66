"""The scenario: one typed, validated configuration object, built from a TOML file.

- ``sections``: one dataclass per TOML table, each checking its own values
  (``cohort``: a ``[[cohorts]]`` entry; ``train``: the ``[train]`` table);
- ``scenario``: :class:`FedfuseConfig`, the whole scenario and the checks that span tables;
- ``loading``: TOML file -> ``--set`` overrides -> dataclasses;
- ``preflight``: the checks that need the data and the models, run before anything starts.

Nothing here imports torch or Flower.
"""

from fedfuse.config.cohort import CohortConfig
from fedfuse.config.loading import apply_override, config_from_dict, load_config, resolve_source
from fedfuse.config.scenario import FedfuseConfig
from fedfuse.config.sections import (
                                    EMBEDDED_DATASETS,
                                    SITE_NAME,
                                    DataConfig,
                                    DeploymentConfig,
                                    FusionConfig,
                                    PartitionConfig,
                                    PrivacyConfig,
                                    RobustnessConfig,
                                    SecureAggregationConfig,
                                    SimulationConfig,
)
from fedfuse.config.train import TrainConfig

__all__ = ["EMBEDDED_DATASETS", "SITE_NAME", "CohortConfig", "DataConfig", "DeploymentConfig",
           "FedfuseConfig", "FusionConfig", "PartitionConfig", "PrivacyConfig",
           "RobustnessConfig", "SecureAggregationConfig", "SimulationConfig", "TrainConfig",
           "apply_override", "config_from_dict", "load_config", "resolve_source"]
