"""Compressed versions of a fused artifact: the fused graph magnitude-pruned and/or with
int8 weights, as ONNX, in an artifact of its own that ``fedfuse serve`` serves beside
the full one (through ONNX Runtime).

Pruning zeroes, in every dense and convolutional layer, the fraction ``p`` of weights of
smallest magnitude (``|w| <= the p-quantile of |w|`` in that layer); int8 quantises the
dense layers' weights (ONNX Runtime's dynamic quantiser). The new manifest records what
was done, the graph's size, its accuracy on the run's held-out test split beside the
source's, and the source version; it is hashed (and signed) like any artifact.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from torch import nn

from fedfuse.artifact.export import export_onnx
from fedfuse.artifact.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    canonical_json,
    content_hash,
    sha256,
)
from fedfuse.artifact.predictor import GRAPH_FILE, ONNX_METHOD, FusedPredictor, OnnxGraph
from fedfuse.artifact.signing import sign_artifact
from fedfuse.atomic import atomic_write_bytes
from fedfuse.data.datasets import Dataset
from fedfuse.errors import FedfuseError


def prune_magnitude(model: nn.Module, fraction: float) -> int:
    """Zero the ``fraction`` of smallest-magnitude weights of every Linear and Conv layer
    of ``model`` (in place, per layer); returns how many weights are zero."""
    zeroed = 0
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            weight = layer.weight.data
            k = int(fraction * weight.numel())
            if k > 0:
                threshold = weight.abs().flatten().kthvalue(k).values
                weight[weight.abs() <= threshold] = 0.0
            zeroed += int((weight == 0).sum())
    return zeroed


def _reference(full: FusedPredictor) -> dict[str, Any]:
    """The source's training input moments, for the served version's drift figures (the
    ONNX graph hides its ``Standardize`` layer)."""
    reference = full.input_reference()
    if reference is None:
        return {}
    return {"input_reference": {"mean": reference[0].tolist(), "std": reference[1].tolist()}}


def compress_artifact(source: Path, out: Path, *, prune: float, int8: bool, semver: str,
                      test: Dataset | None, signer: Ed25519PrivateKey | None = None,
                      allow_arch: tuple[str, ...] = (),
                      trust: tuple[Ed25519PublicKey, ...] | None = None) -> dict[str, Any]:
    """Write ``source``'s fused graph, pruned by ``prune`` and/or int8, as a new artifact
    ``out`` (signed by ``signer``; published whole, by one rename); returns its
    manifest); with ``trust``, ``source`` must be signed by one of those keys."""
    if not 0.0 <= prune < 1.0:
        raise FedfuseError(f"--prune {prune}: expected a fraction in [0, 1)")
    if prune == 0.0 and not int8:
        raise FedfuseError("nothing to compress: give --prune FRACTION, --int8 or both")
    if out.exists():
        raise FedfuseError(f"{out} already exists (choose another --out)")
    full = FusedPredictor.load(source, allow_arch=allow_arch, trust=trust)
    model = copy.deepcopy(full.model).eval()
    zeroed = prune_magnitude(model, prune) if prune else 0
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        example = torch.zeros((2, *full.schema.input_shape))
        export_onnx(model, example, Path(tmp) / GRAPH_FILE, int8)
        graph = (Path(tmp) / GRAPH_FILE).read_bytes()
        fp32_size = len(graph)
        if int8:  # the same graph in float32, for the size the quantisation saved
            export_onnx(model, example, Path(tmp) / "fp32.onnx", False)
            fp32_size = (Path(tmp) / "fp32.onnx").stat().st_size
    small = OnnxGraph(graph)
    accuracy = full_accuracy = None
    if test is not None:
        labels = np.array(full.schema.class_labels)
        truth = labels[test.y]
        with torch.no_grad():
            x = torch.as_tensor(test.X, dtype=torch.float32)
            accuracy = float((labels[small(x).numpy().argmax(axis=1)] == truth).mean())
        full_accuracy = float((full.predict(test.X) == truth).mean())
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "members": [],
        "fusion": {"method": ONNX_METHOD, "graph": GRAPH_FILE, "weights": {},
                   "fit": {"source_method": full.manifest["fusion"]["method"]}},
        "compression": {"source_version": full.version, "prune": prune, "int8": int8,
                        "zeroed_weights": zeroed, "size_bytes": len(graph),
                        "fp32_onnx_size_bytes": fp32_size,
                        "source_size_bytes": sum(f.stat().st_size for f in source.rglob("*")
                                                 if f.is_file() and f.name != MANIFEST),
                        "test_accuracy": accuracy, "source_test_accuracy": full_accuracy},
        "fused_test_accuracy": accuracy,
        "privacy": full.manifest["privacy"],
        **_reference(full),
        "schema": full.manifest["schema"],
        "files": {GRAPH_FILE: sha256(graph)},
    }
    manifest["content_sha256"] = content_hash(manifest)
    manifest["model_version"] = f"{semver}+{manifest['content_sha256'][:12]}"
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    atomic_write_bytes(staging / GRAPH_FILE, graph)
    atomic_write_bytes(staging / MANIFEST, canonical_json(manifest))
    if signer is not None:
        sign_artifact(staging, signer)
    os.rename(staging, out)  # a registry sees the whole version or none of it
    return manifest
