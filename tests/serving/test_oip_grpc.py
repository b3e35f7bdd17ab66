"""The Open Inference Protocol over gRPC, against a real ``fedfuse serve --grpc-port``
process, spoken by a third-party client (Triton's ``tritonclient.grpc``), the standard
gRPC health service and server reflection."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.serving.auth import create_key
from tests.helpers import Server, free_port, make_artifact


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_dataset(DataConfig()).X[:9].astype(np.float32)


@pytest.fixture(scope="module")
def grpc_served(tmp_path_factory):
    """Versions 1.0.0 and 1.1.0 behind one key, gRPC beside HTTP."""
    root = tmp_path_factory.mktemp("oip-grpc")
    make_artifact(root / "registry" / "v1", semver="1.0.0")
    make_artifact(root / "registry" / "v2", semver="1.1.0", seed=5)
    _, key = create_key(root / "keys.json", "a")
    port = free_port()
    with Server(root / "registry", "--api-keys", root / "keys.json", "--grpc-port", port):
        client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        yield client, {"authorization": f"Bearer {key}"}, port, root / "registry"
        client.close()


def tensor(x: np.ndarray) -> triton.InferInput:
    t = triton.InferInput("input", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    return t


def test_a_third_party_grpc_client_gets_the_offline_probabilities(grpc_served, digits):
    client, auth, _, registry = grpc_served
    new, old = (FusedPredictor.load(registry / v) for v in ("v2", "v1"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "fedfuse"
    assert client.is_model_ready("fedfuse", headers=auth)
    assert not client.is_model_ready("fedfuse", model_version="7.0.0", headers=auth)
    meta = client.get_model_metadata("fedfuse", headers=auth)
    assert list(meta.versions) == [old.version, new.version]
    assert list(meta.inputs[0].shape) == [-1, 1, 8, 8] and meta.inputs[0].datatype == "FP32"
    answer = client.infer("fedfuse", [tensor(digits)], headers=auth, request_id="g1")
    assert answer.get_response().model_version == new.version
    assert answer.get_response().id == "g1"
    np.testing.assert_array_equal(answer.as_numpy("probabilities"), new.predict_proba(digits))
    assert [v.decode() for v in answer.as_numpy("label")] == list(new.predict(digits))
    pinned = client.infer("fedfuse", [tensor(digits)], model_version="1.0.0", headers=auth,
                          outputs=[triton.InferRequestedOutput("label")])
    assert [o.name for o in pinned.get_response().outputs] == ["label"]
    assert [v.decode() for v in pinned.as_numpy("label")] == list(old.predict(digits))


def test_grpc_refuses_without_a_key_and_names_bad_requests(grpc_served, digits):
    client, auth, _, _ = grpc_served
    for headers in ({}, {"authorization": "Bearer ffk_00000000_wrong"}):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("fedfuse", [tensor(digits)], headers=headers)
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as refused:
        client.infer("other", [tensor(digits)], headers=auth)
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    wrong = triton.InferInput("input", [9, 64], "FP32")
    wrong.set_data_from_numpy(digits.reshape(9, 64))
    with pytest.raises(InferenceServerException) as refused:
        client.infer("fedfuse", [wrong], headers=auth)
    assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "is not [n, 1, 8, 8]" in refused.value.message()
    huge = digits.astype(np.float64)
    huge[0, 0, 0, 0] = 1e39
    big = triton.InferInput("input", list(huge.shape), "FP64")
    big.set_data_from_numpy(huge)
    with pytest.raises(InferenceServerException) as refused:
        client.infer("fedfuse", [big], headers=auth)
    assert "beyond float32" in refused.value.message()


def test_health_and_reflection_are_served(grpc_served):
    _, _, port, _ = grpc_served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = next(stub.ServerReflectionInfo(iter(
            [reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert {s.name for s in listed.list_services_response.service} >= {
            "inference.GRPCInferenceService", "grpc.health.v1.Health"}
        described = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="inference.ModelInferRequest")])))
        assert described.file_descriptor_response.file_descriptor_proto


def test_grpc_shares_the_rate_limit_and_the_tls_certificate(tmp_path, digits):
    from fedfuse.deploy.pki import create_ca, issue_server_cert, write_pem

    make_artifact(tmp_path / "model")
    _, key = create_key(tmp_path / "keys.json", "a")
    ca = create_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(Encoding.PEM))
    write_pem(issue_server_cert(ca, ["127.0.0.1", "localhost"]), tmp_path / "server.pem",
              tmp_path / "server.key")
    port = free_port()
    with Server(tmp_path / "model", "--api-keys", tmp_path / "keys.json", "--rate-limit",
                "3/minute", "--grpc-port", port, "--tls-cert", tmp_path / "server.pem",
                "--tls-key", tmp_path / "server.key", scheme="https",
                verify=str(tmp_path / "ca.pem")) as server:
        auth = {"authorization": f"Bearer {key}"}
        body = {"instances": digits[:1].tolist()}
        for _ in range(2):  # two of the key's three go over HTTPS ...
            assert httpx.post(server.url + "/v1/predict", json=body, headers=auth,
                              verify=str(tmp_path / "ca.pem")).status_code == 200
        client = triton.InferenceServerClient(url=f"localhost:{port}", ssl=True,
                                              root_certificates=str(tmp_path / "ca.pem"))
        client.infer("fedfuse", [tensor(digits[:1])], headers=dict(auth))  # ... one by gRPC
        with pytest.raises(InferenceServerException) as limited:
            client.infer("fedfuse", [tensor(digits[:1])], headers=dict(auth))
        assert limited.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        client.close()
        plain = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
        with pytest.raises(InferenceServerException):  # plaintext to the TLS port
            plain.is_server_live()
        plain.close()


def test_predict_client_and_query_speak_grpc(grpc_served, digits):
    from fedfuse.serving.client import AuthenticationError, PredictClient, PredictError
    from tests.helpers import run_cli

    _, auth, port, registry = grpc_served
    new = FusedPredictor.load(registry / "v2")
    key = auth["authorization"].removeprefix("Bearer ")
    with PredictClient(f"grpc://127.0.0.1:{port}", api_key=key) as client:
        client.wait_ready(10)
        answer = client.predict(digits)
        assert answer.model_version == new.version
        assert answer.class_labels == list(new.schema.class_labels)
        np.testing.assert_allclose(answer.probabilities, new.predict_proba(digits), atol=1e-7)
        assert list(answer.labels) == list(new.predict(digits))
        assert client.predict(digits, version="1.0.0").model_version.startswith("1.0.0+")
        with pytest.raises(PredictError, match="HTTP API's"):
            client.versions()
    with pytest.raises(AuthenticationError, match="UNAUTHENTICATED"):
        PredictClient(f"grpc://127.0.0.1:{port}", retries=0).predict(digits)
    data = load_dataset(DataConfig())
    truth = np.array(data.schema.class_labels)[data.y]
    accuracy = float((new.predict(data.X) == truth).mean())
    done = run_cli("query", f"grpc://127.0.0.1:{port}", "--data", "digits", "--api-key", key,
                   "--batch", "256")
    assert done.returncode == 0, done.stderr
    assert f"accuracy {accuracy:.4f}" in done.stderr and new.version in done.stderr
