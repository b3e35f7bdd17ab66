"""fedfuse: private federated learning with ensemble fusion, on Flower."""

__version__ = "0.1.0"
