"""The predict API's Python client on its own (against real servers: test_serve.py)."""

import numpy as np
import pytest

from fedfuse.serving.client import ConnectionFailed, PredictClient
from tests.helpers import free_port


def test_the_client_keeps_its_public_name():
    """``from fedfuse.client import PredictClient`` is public API: it goes on working,
    with every name the client module exports, as the very same objects."""
    import fedfuse.client
    import fedfuse.serving.client as serving_client
    from fedfuse.client import PredictClient as Public

    assert Public is PredictClient
    for name in fedfuse.client.__all__:
        assert getattr(fedfuse.client, name) is getattr(serving_client, name), name
    assert {"PredictClient", "Prediction", "PredictError", "ConnectionFailed",
            "AuthenticationError", "InvalidInput", "RateLimited", "NotFound", "ServerError",
            "tls_context"} <= set(fedfuse.client.__all__)


def test_client_gives_up_on_an_unreachable_server():
    digits = np.zeros((1, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ConnectionFailed, match="after 3 attempts"):
        PredictClient(f"http://127.0.0.1:{free_port()}", retries=2,
                      backoff=0.01).predict(digits)
