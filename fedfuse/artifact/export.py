"""Export a fused artifact for serving elsewhere: ONNX (portable) or TorchScript.

Both exports take a batch of shape (n, *input_shape) float32 and return fused class
probabilities (n, K); the batch axis is dynamic. ``int8=True`` quantises the dense layers'
weights to int8 with dynamic activation quantisation: through onnxruntime's quantiser for
ONNX, through ``torch.ao.quantization.quantize_dynamic`` for TorchScript.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedfuse.artifact.predictor import FusedPredictor
from fedfuse.atomic import atomic_write_bytes
from fedfuse.errors import FedfuseError

Format = Literal["onnx", "torchscript"]


def export_model(predictor: FusedPredictor, path: Path, fmt: Format, int8: bool = False) -> None:
    """Write ``predictor``'s fused graph to ``path`` (atomically, one self-contained file)."""
    example = torch.zeros((2, *predictor.schema.input_shape))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        if fmt == "onnx":
            export_onnx(predictor.model, example, out, int8)
        else:
            _export_torchscript(predictor.model, example, out, int8)
        atomic_write_bytes(path, out.read_bytes())


def export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path, int8: bool) -> None:
    """``model``'s graph as ONNX in ``out`` (input ``x`` with a dynamic batch axis, output
    ``proba``), its dense layers' weights int8 with ``int8``."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise FedfuseError("ONNX export needs the export extra: pip install 'fedfuse[export]'") \
            from None
    fp32 = out.with_suffix(".fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"],
                                    output_names=["proba"], verbose=False,
                                    # by position: the graph's argument may not be named x
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    if program is None:
        raise FedfuseError("the ONNX exporter returned no program")
    program.save(str(fp32), external_data=False)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
    else:
        fp32.rename(out)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, out: Path,
                        int8: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace and ao quantisation warn of deprecation
        if int8:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                           dtype=torch.qint8)
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(out))


def run_exported(path: Path, fmt: Format, X: np.ndarray) -> np.ndarray:
    """Fused probabilities from an exported file (onnxruntime or torch.jit)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": X.astype(np.float32)})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.as_tensor(X, dtype=torch.float32)).numpy()
