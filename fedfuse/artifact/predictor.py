"""The fused predictor: an artifact loaded (and verified) behind a schema-checked
``predict`` / ``predict_proba``.

``q(x) = Σ_m w_m softmax(f_m(x))`` for the soft vote, ``softmax(W z(x) + c)`` for the
stacking head over the members' probabilities, or one distilled student.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load as safetensors_load
from torch import nn

from fedfuse.artifact.manifest import ArtifactError, InputError, read_verified
from fedfuse.artifact.signing import trusted_keys
from fedfuse.data.datasets import DataSchema
from fedfuse.errors import FedfuseError
from fedfuse.fusion.stacking import HEAD, StackedModel, load_head
from fedfuse.models.factory import code_identity
from fedfuse.models.registry import Standardize, as_recorded, load_model
from fedfuse.models.spec import CodeAllowance, ModelSpec

log = logging.getLogger(__name__)


class FusedModel(nn.Module):
    """``q(x) = sum_m w_m softmax(f_m(x))``: the members' class probabilities, weighted."""

    def __init__(self, members: list[nn.Module], weights: np.ndarray) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probas = torch.stack([torch.softmax(m(x), dim=1) for m in self.members])
        return torch.einsum("m,mnk->nk", self.weights, probas)


def member_model(entry: dict[str, Any], schema: DataSchema, state: dict[str, torch.Tensor],
                 code: CodeAllowance) -> nn.Module:
    """A manifest member's model with ``state``; its ``model`` record says what builds
    it (a built-in named by ``arch`` in artifacts older than user factories), and a
    built-in's params the record lacks take the class's defaults, not today's fitted
    ones (``fedfuse.models.registry.as_recorded``). A user factory whose module differs
    from the one the artifact was made with is loaded with a warning naming both
    hashes."""
    spec = as_recorded(ModelSpec.from_dict(entry["model"]) if "model" in entry
                       else ModelSpec(entry["arch"]))
    model = load_model(spec, schema, state, code=code, key=f"member {entry['arch']}")
    recorded = entry.get("model", {}).get("code", {}).get("module_sha256")
    found = code_identity(spec).get("module_sha256")
    if recorded and found != recorded:
        log.warning("member %s: module %s has SHA-256 %s, the artifact was made with %s; "
                    "its weights fit, but the code may compute something else",
                    entry["arch"], spec.module, found, recorded)
    return model


def hashed(files: dict[str, bytes], rel: str, directory: Path) -> bytes:
    """The checked bytes of ``rel``; a file the manifest uses but does not hash is refused."""
    if rel not in files:
        raise ArtifactError(f"{directory}: the manifest uses {rel}, which its files list does "
                            "not hash")
    return files[rel]


GRAPH_FILE = "graph.onnx"
ONNX_METHOD = "onnx"
"""The fusion method of a compressed version: one ONNX graph (``fedfuse compress``)."""


class OnnxGraph(nn.Module):
    """An ONNX fused graph behind the module interface the predictor and server use
    (float32 batch in, probabilities out), run by ONNX Runtime on the CPU."""

    def __init__(self, graph: bytes) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise FedfuseError("a compressed (ONNX) version needs ONNX Runtime: pip install "
                               "'fedfuse[export]'") from None

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy().astype(np.float32)})
        return torch.from_numpy(np.asarray(out[0]))


class FusedPredictor:
    """The fused predictor behind a schema-checked ``predict`` / ``predict_proba``: the
    weighted soft vote, the stacked members with their head, or one distilled student
    (a single member of weight 1)."""

    def __init__(self, manifest: dict[str, Any], model: nn.Module,
                 device: str | torch.device = "cpu") -> None:
        self.manifest = manifest
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.schema = DataSchema.from_dict(manifest["schema"])

    @property
    def version(self) -> str:
        return str(self.manifest["model_version"])

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu",
             allow_arch: tuple[str, ...] = (), search: str | None = None,
             trust: Sequence[str | Path | Ed25519PublicKey] | None = None) -> FusedPredictor:
        """Load and verify an artifact directory (refusing tampered or incomplete ones)
        onto ``device``, where its forward pass will run. With ``trust`` (public keys, or
        PEM files of them such as a run's ``signer.pub`` copied out of band) the manifest
        must be signed by one of them. A member built by a user factory is imported only
        if ``allow_arch`` lists its import path (or its module as ``package.module:*``),
        from ``search`` or the Python path. Every file is read once: the bytes checked
        are the bytes loaded."""
        directory = Path(path)
        keys = None if trust is None else tuple(
            k if isinstance(k, Ed25519PublicKey) else trusted_keys([k])[0] for k in trust)
        verified = read_verified(directory, keys)
        manifest, files = verified.manifest, verified.files
        schema = DataSchema.from_dict(manifest["schema"])
        code = CodeAllowance(allow_arch, search=search, how="allow it with `fedfuse serve "
                             "--allow-arch PATH` (FusedPredictor.load(..., allow_arch=...))")
        if manifest["fusion"]["method"] == ONNX_METHOD:
            return cls(manifest, OnnxGraph(hashed(files, manifest["fusion"]["graph"],
                                                  directory)), device)
        members: list[nn.Module] = []
        for entry in manifest["members"]:
            state = safetensors_load(hashed(files, entry["file"], directory))
            members.append(member_model(entry, schema, state, code))
        if manifest["fusion"]["method"] == HEAD:
            head = load_head(safetensors_load(hashed(files, manifest["fusion"]["head"],
                                                     directory)))
            return cls(manifest, nn.Sequential(StackedModel(members, head), nn.Softmax(dim=1)),
                       device)
        weights = np.array([manifest["fusion"]["weights"][e["arch"]]
                            for e in manifest["members"]])
        return cls(manifest, FusedModel(members, weights), device)

    def input_reference(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The per-feature (mean, std) of the training inputs: the manifest's
        ``input_reference`` (a compressed version's), else what the first member's
        ``Standardize`` layer holds; None for a model without one (a user model that
        standardises in its own way)."""
        recorded = self.manifest.get("input_reference")
        if recorded is not None:
            return (np.asarray(recorded["mean"], dtype=np.float64),
                    np.asarray(recorded["std"], dtype=np.float64))
        layer = next((m for m in self.model.modules() if isinstance(m, Standardize)), None)
        if layer is None:
            return None
        return (layer.mean.detach().cpu().numpy().reshape(-1).astype(np.float64),
                layer.std.detach().cpu().numpy().reshape(-1).astype(np.float64))

    def check_input(self, X: Any) -> np.ndarray:
        """``X`` as float32 of shape (n, *input_shape); raises InputError naming the problem."""
        try:
            arr = np.asarray(X)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input is not a rectangular array ({exc})") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                       or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"input dtype {arr.dtype} is not numeric; expected "
                             f"{self.schema.dtype}")
        shape = tuple(self.schema.input_shape)
        if arr.ndim != len(shape) + 1 or tuple(arr.shape[1:]) != shape:
            raise InputError(f"input shape {tuple(arr.shape)} does not match (n, "
                             f"{', '.join(map(str, shape))}) from the artifact's schema")
        if len(arr) == 0:
            raise InputError("input holds no instances")
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
            raise InputError(f"input has NaN or infinite values in instance(s) "
                             f"{bad[:10].tolist()}")
        return arr

    @torch.no_grad()
    def predict_proba(self, X: Any) -> np.ndarray:
        """Fused class probabilities, shape (n, K), columns in ``schema.class_labels`` order."""
        x = torch.as_tensor(self.check_input(X)).to(self.device)
        return self.model(x).cpu().numpy()

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label (from ``schema.class_labels``) for each instance."""
        labels = np.array(self.schema.class_labels)
        return labels[self.predict_proba(X).argmax(axis=1)]
