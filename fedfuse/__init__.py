"""fedfuse: private federated learning with ensemble fusion, on Flower."""

import os as _os

__version__ = "0.1.0"

NO_PHONING_HOME = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
"""Flower's switches for its usage telemetry and its update check, which by default
call out to the internet from every Flower process. fedfuse sets them before Flower is
imported (Flower reads the telemetry switch then), in its own process and so in every
process it starts: neither a partner site nor a simulation phones home."""
_os.environ.update(NO_PHONING_HOME)


def __getattr__(name: str) -> type:  # lazy: importing fedfuse stays cheap for the CLI
    if name == "FusedPredictor":
        from fedfuse.artifact.predictor import FusedPredictor

        return FusedPredictor
    raise AttributeError(name)
