"""``fedfuse.client``: the predict API's Python client, kept at its public name.

The client lives in ``fedfuse.serving.client``; ``from fedfuse.client import
PredictClient`` goes on working.
"""

from fedfuse.serving.client import (
                                    AuthenticationError,
                                    ConnectionFailed,
                                    InvalidInput,
                                    NotFound,
                                    PredictClient,
                                    PredictError,
                                    Prediction,
                                    RateLimited,
                                    ServerError,
                                    tls_context,
)

__all__ = ["AuthenticationError", "ConnectionFailed", "InvalidInput", "NotFound",
           "PredictClient", "PredictError", "Prediction", "RateLimited", "ServerError",
           "tls_context"]
