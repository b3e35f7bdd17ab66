"""fedfuse: private federated learning with ensemble fusion, on Flower."""

__version__ = "0.1.0"


def __getattr__(name: str) -> type:  # lazy: importing fedfuse stays cheap for the CLI
    if name == "FusedPredictor":
        from fedfuse.artifact.predictor import FusedPredictor

        return FusedPredictor
    raise AttributeError(name)
