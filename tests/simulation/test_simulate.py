"""End to end through Flower's real simulation engine (Ray), as a user runs it."""

import json
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, safe_open

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.config import load_config
from fedfuse.data.datasets import DataSchema
from fedfuse.data.sites import plan_federation
from fedfuse.models.registry import build_model
from fedfuse.models.training import evaluate
from tests.helpers import SMALL_SCENARIO, Server, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The small scenario run twice with the same seed, as separate processes."""
    root = tmp_path_factory.mktemp("e2e")
    scenario = root / "tiny.toml"
    scenario.write_text(SMALL_SCENARIO)
    runs = []
    for name in ("a", "b"):
        proc = run_cli("simulate", scenario, "--out", root / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(root / name)
    return scenario, runs


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(two_runs):
    scenario, (run, _) = two_runs
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    members = {f"{d}/{a}.safetensors" for d in ("cohorts", "model/members")
               for a in ("cnn", "mlp", "logreg")}
    assert names == {"config.toml", "clients.json", "metrics.jsonl", "accuracy.png",
                     "summary.json", "fusion_stats.json", "model/manifest.json",
                     "model/manifest.sig", "signer.pub"} | members
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tomllib.loads((run / "config.toml").read_text())["name"] == "tiny"
    clients = json.loads((run / "clients.json").read_text())
    assert sorted(c["index"] for c in clients) == list(range(9))
    assert {c["arch"] for c in clients} == {"cnn", "mlp", "logreg"}


def test_metrics_have_one_line_per_round_with_every_cohort(two_runs):
    _, (run, _) = two_runs
    rounds = read_metrics(run)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["cohorts"]) == {"cnn", "mlp", "logreg"}
        for c in r["cohorts"].values():
            assert c["train_clients"] == 3 and c["train_failures"] == 0
            assert 0.0 <= c["test_accuracy"] <= 1.0 and 0.0 <= c["val_accuracy"] <= 1.0
            assert np.isfinite(c["train_loss"])


def test_summary_matches_the_saved_models(two_runs):
    scenario, (run, _) = two_runs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["clients"] == 9
    assert summary["secure_aggregation"] is True  # on by default
    assert summary["secure_sums"] == 3 * 2  # every cohort, every round
    assert summary["privacy"] == {"mode": "off", "max_epsilon": None, "delta": None}
    assert summary["wall_seconds"] > 0
    assert summary["device"] == "cpu"
    cfg = load_config(run / "config.toml")
    test = plan_federation(cfg).test
    last = read_metrics(run)[-1]["cohorts"]
    for arch in ("cnn", "mlp", "logreg"):
        path = run / "cohorts" / f"{arch}.safetensors"
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata()
        assert meta["arch"] == arch
        model = build_model(arch, DataSchema.from_dict(json.loads(meta["schema"])))
        model.load_state_dict(load_file(path))
        acc = evaluate(model, test.X, test.y).accuracy
        assert acc == pytest.approx(summary["cohorts"][arch]["test_accuracy"], abs=1e-9)
        assert acc == pytest.approx(last[arch]["test_accuracy"], abs=1e-9)
        assert acc > 0.2  # two short rounds already beat chance (0.1)
        assert summary["cohorts"][arch]["clients"] == 3


def test_fused_artifact_loads_and_matches_the_summary(two_runs):
    _, (run, _) = two_runs
    summary = json.loads((run / "summary.json").read_text())
    fused = summary["fused"]
    assert fused["method"] == "soft_vote"
    assert sum(fused["weights"].values()) == pytest.approx(1.0)
    predictor = FusedPredictor.load(run / "model")
    test = plan_federation(load_config(run / "config.toml")).test
    labels = np.array(test.schema.class_labels)[test.y]
    acc = float((predictor.predict(test.X) == labels).mean())
    assert acc == pytest.approx(fused["test_accuracy"], abs=1e-9)
    stats = json.loads((run / "fusion_stats.json").read_text())
    assert stats["sites"] == 9
    assert stats["num_examples"] == sum(c["num_val"] for c in
                                        json.loads((run / "clients.json").read_text()))
    manifest = predictor.manifest
    assert manifest["fused_test_accuracy"] == fused["test_accuracy"]
    assert {m["arch"]: m["test_accuracy"] for m in manifest["members"]} == {
        a: c["test_accuracy"] for a, c in summary["cohorts"].items()}


def test_served_artifact_answers_like_the_run(two_runs):
    """Usage 3 on usage 1's output: serve the run's artifact with a key, query it over
    HTTP with the run's test split, get the run's fused test accuracy."""
    _, (run, _) = two_runs
    fused = json.loads((run / "summary.json").read_text())["fused"]
    keys = run.parent / "keys.json"
    key = run_cli("keys", "create", "--file", keys, "--quiet").stdout.strip()
    with Server(run / "model", "--api-keys", keys, "--trust", run / "signer.pub") as server:
        proc = run_cli("query", server.url, "--run", run, "--batch", "50",
                       "--api-key", key)
        assert proc.returncode == 0, proc.stderr
        assert f"accuracy {fused['test_accuracy']:.4f}" in proc.stderr
        refused = run_cli("query", server.url, "--run", run)
        assert refused.returncode == 2 and "HTTP 401" in refused.stderr


def test_same_seed_gives_same_metrics_and_models(two_runs):
    _, (a, b) = two_runs
    strip = lambda rs: [{**r, "wall_seconds": None} for r in rs]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))
    for arch in ("cnn", "mlp", "logreg"):
        sa = load_file(a / "cohorts" / f"{arch}.safetensors")
        sb = load_file(b / "cohorts" / f"{arch}.safetensors")
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fuse_rebuilds_the_artifact_from_the_run(two_runs, tmp_path):
    import shutil

    _, (run, _) = two_runs
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    original = FusedPredictor.load(run / "model")
    shutil.rmtree(copy / "model")
    proc = run_cli("fuse", copy, "--version", "2.0.0")
    assert proc.returncode == 0, proc.stderr
    rebuilt = FusedPredictor.load(copy / "model", trust=[run / "signer.pub"])  # same key
    assert rebuilt.version.startswith("2.0.0+")
    assert rebuilt.manifest["fusion"]["weights"] == pytest.approx(
        original.manifest["fusion"]["weights"], abs=1e-9)
    X = plan_federation(load_config(run / "config.toml")).test.X
    np.testing.assert_allclose(rebuilt.predict_proba(X), original.predict_proba(X), atol=1e-6)
    assert not [p for p in copy.iterdir() if p.name.startswith(".model")]
    proc = run_cli("fuse", copy, "--method", "distill")
    assert proc.returncode == 2 and "has no distilled student" in proc.stderr
    proc = run_cli("fuse", copy, "--method", "stacking")
    assert proc.returncode == 2 and "--method 'stacking'" in proc.stderr
    (copy / "fusion_stats.json").unlink()
    proc = run_cli("fuse", copy)
    assert proc.returncode == 2 and "missing fusion_stats.json" in proc.stderr
    FusedPredictor.load(copy / "model")  # the previous artifact is untouched


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exports_reproduce_the_fused_model(two_runs, tmp_path, fmt):
    from fedfuse.artifact.export import run_exported

    _, (run, _) = two_runs
    test = plan_federation(load_config(run / "config.toml")).test
    reference = FusedPredictor.load(run / "model").predict_proba(test.X)
    ref_acc = float((reference.argmax(1) == test.y).mean())
    for int8 in (False, True):
        out = tmp_path / f"model-{int8}.{fmt}"
        proc = run_cli("export", run / "model", "--out", out, "--format", fmt,
                       *(["--int8"] if int8 else []))
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = run_exported(out, fmt, test.X)
        assert got.shape == reference.shape
        if int8:
            acc = float((got.argmax(1) == test.y).mean())
            assert acc >= ref_acc - 0.05, (acc, ref_acc)
            assert out.stat().st_size < (tmp_path / f"model-False.{fmt}").stat().st_size
        else:
            np.testing.assert_allclose(got, reference, atol=1e-5)


def test_export_refuses_an_unknown_format(two_runs, tmp_path):
    _, (run, _) = two_runs
    proc = run_cli("export", run / "model", "--out", tmp_path / "m", "--format", "tflite")
    assert proc.returncode == 2 and "expected 'onnx' or 'torchscript'" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_a_pruned_int8_version_is_served_beside_the_full_one(two_runs, tmp_path):
    """``fedfuse compress`` on the run's artifact: a signed ONNX version, half its weights
    zero and int8, with its size and accuracy in the manifest, served next to the full
    version from one registry."""
    import shutil

    _, (run, _) = two_runs
    registry = tmp_path / "registry"
    shutil.copytree(run / "model", registry / "v1")
    done = run_cli("compress", run / "model", "--prune", "0.5", "--int8", "--out",
                   registry / "v2", "--version", "1.1.0")
    assert done.returncode == 0, done.stderr
    small = FusedPredictor.load(registry / "v2", trust=[run / "signer.pub"])
    full = FusedPredictor.load(run / "model")
    info = small.manifest["compression"]
    assert info["source_version"] == full.version and info["prune"] == 0.5 and info["int8"]
    assert info["size_bytes"] == (registry / "v2" / "graph.onnx").stat().st_size
    assert info["size_bytes"] < info["fp32_onnx_size_bytes"]
    assert info["zeroed_weights"] > 0
    test = plan_federation(load_config(run / "config.toml")).test
    truth = np.array(full.schema.class_labels)[test.y]
    accuracy = float((small.predict(test.X) == truth).mean())
    assert info["test_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert info["source_test_accuracy"] == pytest.approx(float((full.predict(test.X) == truth)
                                                              .mean()), abs=1e-12)
    assert abs(accuracy - info["source_test_accuracy"]) < 0.1
    with Server(registry, "--trust", run / "signer.pub") as server:
        listed = httpx.get(server.url + "/v1/models").json()
        assert [v["model_version"] for v in listed["versions"]] == [full.version, small.version]
        for version, model in (("1.0.0", full), ("1.1.0", small)):
            answer = httpx.post(f"{server.url}/v1/models/{version}/predict",
                                json={"instances": test.X[:20].tolist()}).json()
            assert answer["labels"] == list(model.predict(test.X[:20]))
        # the ONNX version's drift is measured against its source's training moments
        for version in ("1.0.0", "1.1.0"):
            quality = httpx.get(f"{server.url}/v1/models/{version}/quality").json()
            assert quality["instances"] == 20 and quality["drift"] is not None
            assert quality["drift"]["mean_shift"] < 1.0
    mean, std = small.input_reference()
    assert np.array_equal(mean, full.input_reference()[0]) and np.all(std > 0)
    refused = run_cli("compress", run / "model", "--out", tmp_path / "none")
    assert refused.returncode == 2 and "nothing to compress" in refused.stderr
