"""The Open Inference Protocol (KServe v2) over REST, against a real ``fedfuse serve``
process, spoken by a third-party client (Triton's ``tritonclient.http``) and by raw HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.serving.auth import create_key
from tests.helpers import Server, make_artifact


@pytest.fixture(scope="module")
def oip(tmp_path_factory):
    """Versions 1.0.0 and 1.1.0 behind one key, and the digits inputs. (tritonclient adds
    its own headers to the dict it is given: each call gets a copy of `auth`.)"""
    root = tmp_path_factory.mktemp("oip")
    make_artifact(root / "registry" / "v1", semver="1.0.0")
    make_artifact(root / "registry" / "v2", semver="1.1.0", seed=5)
    _, key = create_key(root / "keys.json", "a")
    x = load_dataset(DataConfig()).X[:12].astype(np.float32)
    with Server(root / "registry", "--api-keys", root / "keys.json") as server:
        client = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
        yield server, client, {"Authorization": f"Bearer {key}"}, x, root / "registry"
        client.close()


def request_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_a_third_party_client_gets_the_offline_probabilities(oip):
    server, client, auth, x, registry = oip
    new, old = (FusedPredictor.load(registry / v) for v in ("v2", "v1"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "fedfuse"
    assert client.is_model_ready("fedfuse", headers=dict(auth))
    meta = client.get_model_metadata("fedfuse", headers=dict(auth))
    assert meta["versions"] == [old.version, new.version]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["parameters"]["class_labels"] == list(new.schema.class_labels)
    for binary in (False, True):  # JSON data, and the binary tensor extension both ways
        outputs = [triton.InferRequestedOutput(n, binary_data=binary)
                   for n in ("probabilities", "label")]
        answer = client.infer("fedfuse", [request_input(x, binary)], outputs=outputs,
                              headers=dict(auth), request_id="r1")
        assert answer.get_response()["model_version"] == new.version
        assert answer.get_response()["id"] == "r1"
        np.testing.assert_array_equal(answer.as_numpy("probabilities"), new.predict_proba(x))
        labels = answer.as_numpy("label")
        assert [v.decode() if isinstance(v, bytes) else v for v in labels] == \
            list(new.predict(x))
    # no outputs named: the client asks for every output in binary
    answer = client.infer("fedfuse", [request_input(x, True)], headers=dict(auth))
    np.testing.assert_array_equal(answer.as_numpy("probabilities"), new.predict_proba(x))
    # a version by its semver alone, as the protocol's version path
    pinned = client.infer("fedfuse", [request_input(x, False)], model_version="1.0.0",
                          headers=dict(auth))
    assert pinned.get_response()["model_version"] == old.version
    np.testing.assert_array_equal(pinned.as_numpy("probabilities"), old.predict_proba(x))


def test_without_a_key_the_protocol_says_unauthenticated(oip):
    server, client, _, x, _ = oip
    with pytest.raises(InferenceServerException) as refused:
        client.infer("fedfuse", [request_input(x, False)])
    assert refused.value.status() == "401" and "API key" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_metadata("fedfuse", headers={"Authorization": "Bearer ffk_no"})
    assert refused.value.status() == "401"
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200  # probes stay open


@pytest.mark.parametrize("change, status, needle", [
    (lambda r: r["inputs"][0].update(shape=[2, 64]), 400, "is not [n, 1, 8, 8]"),
    (lambda r: r["inputs"][0].update(shape=5), 400, "shape 5 is not [n, 1, 8, 8]"),
    (lambda r: r["inputs"][0].update(datatype="BYTES"), 400, "not a numeric tensor type"),
    (lambda r: r["inputs"][0]["data"].__setitem__(5, 1e39), 400, "beyond float32"),
    (lambda r: r["inputs"][0]["data"].__setitem__(5, "x"), 400, "data must be numbers"),
    (lambda r: r["inputs"][0].update(data=[0.0] * 127), 400, "127 values do not fill"),
    (lambda r: r.update(outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    (lambda r: r.update(inputs=[]), 400, "exactly one input tensor"),
])
def test_a_bad_request_gets_400_naming_the_problem(oip, change, status, needle):
    server, _, auth, _, _ = oip
    request = {"inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32",
                           "data": [0.0] * 128}]}
    change(request)
    answer = httpx.post(server.url + "/v2/models/fedfuse/infer", headers=dict(auth),
                        content=json.dumps(request))
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]


def test_unknown_models_and_versions_are_404(oip):
    server, _, auth, _, _ = oip
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.0] * 64}]})
    for path, needle in (("/v2/models/other/infer", "unknown model 'other'"),
                         ("/v2/models/fedfuse/versions/9.9.9/infer", "no version '9.9.9'")):
        answer = httpx.post(server.url + path, headers=dict(auth), content=body)
        assert answer.status_code == 404 and needle in answer.json()["error"]
    assert httpx.get(server.url + "/v2/models/fedfuse/versions/9.9.9/ready",
                     headers=dict(auth)).status_code == 404
