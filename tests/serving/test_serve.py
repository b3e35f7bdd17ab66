"""The predict API against real ``fedfuse serve`` processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import shutil
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.serving.auth import create_key
from fedfuse.serving.client import (
    AuthenticationError,
    ConnectionFailed,
    InvalidInput,
    NotFound,
    PredictClient,
    RateLimited,
    tls_context,
)
from tests.helpers import Server, free_port, make_artifact, run_cli


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_dataset(DataConfig()).X


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with version 1.0.0, a keys file with two keys, one server."""
    root = tmp_path_factory.mktemp("serve")
    make_artifact(root / "registry" / "v1", semver="1.0.0")
    keys = root / "keys.json"
    _, key_a = create_key(keys, "a")
    _, key_b = create_key(keys, "b")
    with Server(root / "registry", "--api-keys", keys, "--max-wait-ms", "20") as server:
        yield server, root, key_a, key_b


def post(server: Server, body, key: str | None, path: str = "/v1/predict",
         **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, verify=tls_context(server.verify),
                      headers={"content-type": "application/json", **headers}, **kwargs)


def metric(server: Server, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    text = httpx.get(server.url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample == name and got == want:
            return float(value)
    return 0.0


def test_predictions_equal_the_offline_predictor(served, digits):
    server, root, key, _ = served
    offline = FusedPredictor.load(root / "registry" / "v1")
    X = digits[:100]
    with PredictClient(server.url, api_key=key) as client:
        result = client.predict(X)
    assert result.model_version == offline.version
    assert result.class_labels == list(offline.schema.class_labels)
    assert (result.labels == offline.predict(X)).all()
    np.testing.assert_allclose(result.probabilities, offline.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_key_is_required_and_checked(served, digits):
    server, root, key, other = served
    body = {"instances": digits[:2].tolist()}
    assert post(server, body, None).status_code == 401
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    answer = post(server, body, wrong)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["error"] == "unauthorized"
    assert httpx.get(server.url + "/v1/model").status_code == 401
    assert post(server, body, key).status_code == 200
    assert post(server, body, other).status_code == 200
    by_header = httpx.post(server.url + "/v1/predict", json=body, headers={"X-API-Key": key})
    assert by_header.status_code == 200
    with pytest.raises(AuthenticationError, match="401"):
        PredictClient(server.url, api_key=wrong).predict(digits[:1])
    # the keys file holds hashes only, readable by its owner only
    stored = (root / "keys.json").read_text()
    assert key not in stored and other not in stored
    assert stat.S_IMODE((root / "keys.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("body, field, needle", [
    ({"instances": [[[[1.0] * 8]]]}, "instances[0][0]", "at least 8"),
    ({"instances": [[[["x"] * 8] * 8]]}, "instances[0][0][0][0]", "valid number"),
    ({"instances": [[[[True] * 8] * 8]]}, "instances[0][0][0][0]", "valid number"),
    ({"instances": []}, "instances", "at least 1"),
    ({"instances": [[[[0.0] * 8] * 8]] * 257}, "instances", "at most 256"),
    ({"inputs": [[[[0.0] * 8] * 8]]}, "instances", "Field required"),
    ([1, 2], "body", "should be an object"),
])
def test_bad_input_gets_422_naming_the_field(served, body, field, needle):
    server, _, key, _ = served
    answer = post(server, body, key)
    assert answer.status_code == 422, answer.text
    error = answer.json()
    assert error["error"] == "invalid_input" and error["field"] == field
    assert needle in error["message"] and "[1, 8, 8]" in error["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_get_422(served, value):
    server, _, key, _ = served
    rows = [[[0.0] * 8 for _ in range(8)]]
    text = json.dumps({"instances": [rows]}).replace("0.0", value, 1)
    answer = post(server, text, key)
    assert answer.status_code == 422
    assert answer.json()["field"] == "instances[0][0][0][0]"
    assert "finite" in answer.json()["message"]


def test_malformed_json_and_oversized_bodies(served):
    server, _, key, _ = served
    assert post(server, b'{"instances": [', key).status_code == 422
    big = b'{"instances": [' + b"0," * (3 * 1024 * 1024) + b"0]}"
    answer = post(server, big, key)
    assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        yield b'{"instances": ['
        for _ in range(64):
            yield b"0," * 65536
        yield b"0]}"

    streamed = httpx.post(server.url + "/v1/predict", content=chunks(),
                          headers={"Authorization": f"Bearer {key}"})
    assert streamed.status_code == 413
    # the server is unharmed
    assert post(server, {"instances": [[[[0.0] * 8] * 8]]}, key).status_code == 200


def test_versions_endpoints_and_manifest(served, digits):
    server, root, key, _ = served
    offline = FusedPredictor.load(root / "registry" / "v1")
    with PredictClient(server.url, api_key=key) as client:
        info = client.model()
        assert info["model_version"] == offline.version
        assert "files" not in info and "fit" not in info["fusion"]
        assert [m["arch"] for m in info["members"]] == ["cnn", "mlp", "logreg"]
        listed = client.versions()
        assert listed["latest"] == offline.version
        by_semver = client.predict(digits[:3], version="1.0.0")
        by_full = client.predict(digits[:3], version=offline.version)
        assert by_semver.model_version == by_full.model_version == offline.version
        with pytest.raises(NotFound, match="9.9.9"):
            client.predict(digits[:3], version="9.9.9")
        with pytest.raises(InvalidInput) as err:
            client.predict(np.zeros((2, 64)))
        assert err.value.field == "instances[0]"


def test_health_readiness_and_openapi(served):
    server, *_ = served
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"].startswith("1.0.0+")
    schema = httpx.get(server.url + "/openapi.json").json()
    assert schema["paths"]["/v1/predict"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    body = schema["components"]["schemas"]["PredictRequest"]["properties"]["instances"]
    assert body["maxItems"] == 256 and body["items"]["minItems"] == 1


def test_metrics_move(served, digits):
    server, _, key, _ = served
    ok = dict(route="/v1/predict", method="POST", status="200")
    before = {"ok": metric(server, "fedfuse_http_requests_total", **ok),
              "bad": metric(server, "fedfuse_http_errors_total", kind="invalid_input"),
              "unauth": metric(server, "fedfuse_http_errors_total", kind="unauthorized"),
              "rows": metric(server, "fedfuse_batch_rows_sum"),
              "latency": metric(server, "fedfuse_http_request_duration_seconds_count",
                                route="/v1/predict")}
    for _ in range(3):
        assert post(server, {"instances": digits[:5].tolist()}, key).status_code == 200
    assert post(server, {"instances": []}, key).status_code == 422
    assert post(server, {"instances": []}, None).status_code == 401
    assert metric(server, "fedfuse_http_requests_total", **ok) == before["ok"] + 3
    assert metric(server, "fedfuse_http_errors_total", kind="invalid_input") == before["bad"] + 1
    assert metric(server, "fedfuse_http_errors_total",
                  kind="unauthorized") == before["unauth"] + 1
    assert metric(server, "fedfuse_batch_rows_sum") == before["rows"] + 15
    assert metric(server, "fedfuse_http_request_duration_seconds_count",
                  route="/v1/predict") == before["latency"] + 5
    assert metric(server, "fedfuse_model_versions_loaded") == 1


def test_concurrent_requests_share_forward_passes(served, digits):
    server, root, key, _ = served
    offline = FusedPredictor.load(root / "registry" / "v1")
    passes = metric(server, "fedfuse_batch_requests_count")
    coalesced = metric(server, "fedfuse_batch_requests_sum")

    with PredictClient(server.url, api_key=key) as client, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.predict(digits[i:i + 1 + i % 3]), range(64)))
    for i, result in enumerate(results):  # every caller gets its own rows back
        assert (result.labels == offline.predict(digits[i:i + 1 + i % 3])).all()
    requests = metric(server, "fedfuse_batch_requests_sum") - coalesced
    forwards = metric(server, "fedfuse_batch_requests_count") - passes
    assert requests == 64
    assert forwards < 64  # with 16 callers and a 20 ms window, some passes were shared


def test_rate_limit_is_per_key(tmp_path, digits):
    make_artifact(tmp_path / "model")
    keys = tmp_path / "keys.json"
    _, a = create_key(keys, "a")
    _, b = create_key(keys, "b")
    body = {"instances": digits[:1].tolist()}
    with Server(tmp_path / "model", "--api-keys", keys, "--rate-limit", "3/minute") as server:
        assert [post(server, body, a).status_code for _ in range(3)] == [200] * 3
        limited = post(server, body, a)
        assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert post(server, body, b).status_code == 200  # another key has its own budget
        with pytest.raises(RateLimited, match="429"):
            PredictClient(server.url, api_key=a, retries=0).predict(digits[:1])
        # Retry-After (up to a minute) is over max_retry_wait: no retry, raised at once
        with pytest.raises(RateLimited, match="429"):
            PredictClient(server.url, api_key=a, retries=3, max_retry_wait=0.5).predict(
                digits[:1])
        assert metric(server, "fedfuse_http_errors_total", kind="rate_limited") == 3


def test_new_version_goes_live_without_failed_requests(tmp_path, digits):
    registry = tmp_path / "registry"
    make_artifact(registry / "v1", semver="1.0.0")
    old = FusedPredictor.load(registry / "v1")
    statuses: list[int] = []
    versions: set[str] = set()
    stop = threading.Event()

    def hammer(url: str) -> None:
        with httpx.Client(base_url=url) as http:
            while not stop.is_set():
                answer = http.post("/v1/predict", json={"instances": digits[:4].tolist()})
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    versions.add(answer.json()["model_version"])

    with Server(registry, "--reload-interval", "0.2") as server:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hammer, server.url)
            time.sleep(1.0)
            staging = tmp_path / "staging"  # written elsewhere, then moved in whole
            make_artifact(staging, semver="1.1.0", seed=7)
            new = FusedPredictor.load(staging)
            shutil.move(staging, registry / "v2")
            deadline = time.monotonic() + 20
            while new.version not in versions and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            stop.set()
        assert new.version in versions and old.version in versions
        assert statuses and set(statuses) == {200}, f"{len(statuses)} requests"
        latest = httpx.post(server.url + "/v1/predict",
                            json={"instances": digits[:20].tolist()}).json()
        assert latest["model_version"] == new.version
        assert (np.array(latest["labels"]) == new.predict(digits[:20])).all()
        pinned = httpx.post(server.url + "/v1/models/1.0.0/predict",
                            json={"instances": digits[:20].tolist()}).json()
        assert (np.array(pinned["labels"]) == old.predict(digits[:20])).all()
        # a version whose directory goes away is unloaded
        shutil.rmtree(registry / "v1")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and httpx.post(
                server.url + "/v1/models/1.0.0/predict",
                json={"instances": digits[:1].tolist()}).status_code != 404:
            time.sleep(0.1)
        listed = httpx.get(server.url + "/v1/models").json()
        assert [v["model_version"] for v in listed["versions"]] == [new.version]


def test_tampered_version_is_not_served(tmp_path, digits):
    registry = tmp_path / "registry"
    make_artifact(registry / "v1", semver="1.0.0")
    with Server(registry, "--reload-interval", "0.2") as server:
        make_artifact(tmp_path / "staging", semver="2.0.0", seed=3)
        member = tmp_path / "staging" / "members" / "mlp.safetensors"
        data = bytearray(member.read_bytes())
        data[-1] ^= 1
        member.write_bytes(bytes(data))
        shutil.move(tmp_path / "staging", registry / "v2")
        deadline = time.monotonic() + 20
        while "not serving" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "SHA-256 does not match" in server.output()
        answer = httpx.post(server.url + "/v1/predict", json={"instances": digits[:1].tolist()})
        assert answer.json()["model_version"].startswith("1.0.0+")


def test_tls(tmp_path, digits):
    from fedfuse.deploy.pki import create_ca, issue_server_cert, write_pem

    make_artifact(tmp_path / "model")
    ca = create_ca()
    (tmp_path / "ca.pem").write_bytes(
        ca.cert.public_bytes(__import__("cryptography").hazmat.primitives.serialization
                             .Encoding.PEM))
    write_pem(issue_server_cert(ca, ["127.0.0.1", "localhost"]), tmp_path / "server.pem",
              tmp_path / "server.key")
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600
    ca_file = str(tmp_path / "ca.pem")
    with Server(tmp_path / "model", "--tls-cert", tmp_path / "server.pem", "--tls-key",
                tmp_path / "server.key", scheme="https", verify=ca_file) as server:
        with PredictClient(server.url, verify=ca_file) as client:
            assert len(client.predict(digits[:3]).labels) == 3
        with pytest.raises(ConnectionFailed):  # the system CAs do not know ours
            PredictClient(server.url, retries=0).predict(digits[:1])
        with pytest.raises(httpx.HTTPError):  # plaintext to the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)


def test_keys_cli(tmp_path):
    keys = tmp_path / "keys.json"
    created = run_cli("keys", "create", "--file", keys, "--name", "partner-a", "--quiet")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("ffk_") and key not in keys.read_text()
    listed = run_cli("keys", "list", "--file", keys)
    key_id = key.split("_")[1]
    assert key_id in listed.stderr and "partner-a" in listed.stderr
    assert run_cli("keys", "revoke", key_id, "--file", keys).returncode == 0
    assert json.loads(keys.read_text()) == {"keys": []}
    again = run_cli("keys", "revoke", key_id, "--file", keys)
    assert again.returncode == 2 and f"no key with id '{key_id}'" in again.stderr


@pytest.mark.parametrize("args, needle", [
    (["--rate-limit", "lots"], "serve.rate_limit"),
    (["--api-keys", "missing.json"], "serve.api_keys: file not found"),
    (["--tls-cert", "cert.pem"], "serve.tls_key: tls_cert and tls_key go together"),
    (["--max-batch-size", "0"], "serve.max_batch_size: must be >= 1"),
])
def test_serve_refuses_bad_settings(tmp_path, args, needle):
    make_artifact(tmp_path / "model")
    proc = run_cli("serve", tmp_path / "model", "--port", str(free_port()), *args,
                   cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_serve_refuses_a_directory_without_artifacts(tmp_path):
    proc = run_cli("serve", tmp_path, "--port", str(free_port()), timeout=60)
    assert proc.returncode == 2 and "no artifact" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_openapi_fuzz_finds_no_server_error(served):
    """schemathesis generates requests from the served OpenAPI schema; no 5xx allowed."""
    import subprocess
    import sys

    server, _, key, _ = served
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run",
         f"{server.url}/openapi.json", "--checks", "not_a_server_error",
         "--header", f"Authorization: Bearer {key}", "--max-examples", "60",
         "--seed", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    generated = re.search(r"(\d+) generated", proc.stdout)
    assert generated and int(generated.group(1)) >= 100, proc.stdout[-2000:]


def test_serve_refuses_a_tampered_artifact(tmp_path):
    make_artifact(tmp_path / "model")
    member = tmp_path / "model" / "members" / "cnn.safetensors"
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 1
    member.write_bytes(bytes(data))
    proc = run_cli("serve", tmp_path / "model", "--port", str(free_port()), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "no artifact passes verification" in proc.stderr
    assert "cnn.safetensors: SHA-256 does not match" in proc.stderr
