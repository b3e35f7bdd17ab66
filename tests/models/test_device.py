"""Devices: names checked in config, a GPU this machine lacks refused before anything
starts, Ray's GPU shares, and (where PyTorch sees a GPU) a run trained and served on it."""

import json

import httpx
import numpy as np
import pytest
import torch

from fedfuse.config import load_config
from fedfuse.errors import ConfigError
from fedfuse.models.device import check_device_name, ray_gpus, resolve_device, worker_device
from fedfuse.simulation.runner import backend_config
from tests.helpers import ROOT, Server, assert_refused, error_lines, make_artifact, run_cli

CUDA = torch.cuda.is_available()
no_cuda_here = pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "mps", ""])
def test_bad_device_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"serve\.device: .* is not a device; use 'cpu'"):
        check_device_name(name, "serve.device")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12", "auto"])
def test_device_names_of_the_accepted_forms_pass(name):
    check_device_name(name, "device")


def test_scenario_device_is_checked_with_its_key(scenario):
    with pytest.raises(ConfigError, match=r"^config: device: 'gpu' is not a device"):
        load_config(scenario(), overrides=['device="gpu"'])
    assert load_config(scenario()).device == "cpu"


def test_resolve_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")


@no_cuda_here
def test_resolve_cuda_without_a_gpu_names_the_key():
    with pytest.raises(ConfigError, match=r"--device: 'cuda:1': PyTorch sees no CUDA GPU"):
        resolve_device("cuda:1", "--device")


@no_cuda_here
def test_simulate_on_a_missing_gpu_is_refused_before_the_run(scenario, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("simulate", scenario(), "--out", out, "--device", "cuda")
    assert_refused(proc, out, "device: 'cuda': PyTorch sees no CUDA GPU on this machine")


@no_cuda_here
def test_serve_on_a_missing_gpu_exits_before_binding(tmp_path):
    make_artifact(tmp_path / "model")
    proc = run_cli("serve", tmp_path / "model", "--port", "0", "--device", "cuda", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "device: 'cuda': PyTorch sees no CUDA GPU" in error_lines(proc)[0]
    assert "Uvicorn running" not in proc.stderr


@no_cuda_here
def test_site_on_a_missing_gpu_is_refused_before_connecting(tmp_path):
    proc = run_cli("site", "--coordinator", "127.0.0.1:9", "--certs", tmp_path / "certs",
                   "--name", "a", "--data", tmp_path / "a.npz", "--state", tmp_path / "state",
                   "--device", "cuda", "--connect-timeout", "1", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "--device: 'cuda': PyTorch sees no CUDA GPU" in error_lines(proc)[0]
    assert not (tmp_path / "state").exists()


def test_what_ray_and_its_workers_are_given():
    assert ray_gpus("cpu") == 0
    assert ray_gpus("auto") == torch.cuda.device_count()
    assert [worker_device(n) for n in ("cpu", "auto", "cuda", "cuda:3")] == [
        "cpu", "auto", "cuda", "cuda"]  # a worker sees only its own GPU, as cuda


def test_ray_gpu_shares(scenario):
    cfg = load_config(scenario())  # num_cpus 2, one CPU per client: two clients at once
    assert backend_config(cfg)["client_resources"]["num_gpus"] == 0.0
    assert backend_config(cfg)["init_args"]["num_gpus"] == 0
    on_gpu = backend_config(cfg, gpus=1)
    assert on_gpu["client_resources"]["num_gpus"] == 0.5
    assert on_gpu["init_args"]["num_gpus"] == 1
    cfg = load_config(scenario(), overrides=["simulation.gpus_per_client=0.25"])
    assert backend_config(cfg, gpus=2)["client_resources"]["num_gpus"] == 0.25
    with pytest.raises(ConfigError, match="simulation.gpus_per_client: must be in"):
        load_config(scenario(), overrides=["simulation.gpus_per_client=1.5"])


@pytest.mark.slow
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_train_and_serve_on_the_gpu(scenario, tmp_path):
    """DP-SGD and secure aggregation on the GPU, then the artifact served from it: the
    summary records the GPU, and served probabilities equal the CPU predictor's."""
    from fedfuse.artifact.predictor import FusedPredictor

    out = tmp_path / "run"
    proc = run_cli("simulate", scenario(), "--out", out, "--device", "cuda",
                   "--set", 'privacy.mode="sample"', "--set", "privacy.target_epsilon=8")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda:0 (")
    assert 0.0 < summary["privacy"]["max_epsilon"] <= 8.0
    assert summary["fused"]["test_accuracy"] > 0.3
    X = np.random.default_rng(0).normal(size=(5, 1, 8, 8)).astype(np.float32)
    expected = FusedPredictor.load(out / "model").predict_proba(X)
    with Server(out / "model", "--device", "cuda") as server:
        reply = httpx.post(f"{server.url}/v1/predict", json={"instances": X.tolist()})
        assert reply.status_code == 200, reply.text
        got = np.array(reply.json()["probabilities"])
        assert "forward passes run on cuda" in server.output()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bench_tables_name_the_device():
    """The bench tables name the device they ran on (``common.machine``)."""
    import sys

    sys.path.insert(0, str(ROOT / "simulations" / "bench"))
    from common import machine

    assert machine("cpu").endswith(", cpu")
    with pytest.raises(ConfigError, match="--device: 'tpu' is not a device"):
        machine("tpu")
