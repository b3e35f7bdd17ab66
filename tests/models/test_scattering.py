"""The fixed scattering transform (``fedfuse.models.scattering``) and the built-in ``cnn``
that puts it in front of its convolution on images of 16 pixels a side or more."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedfuse.data.datasets import DataSchema
from fedfuse.errors import ConfigError
from fedfuse.models.registry import build_model
from fedfuse.models.scattering import (
    XI0,
    Scattering2D,
    coefficients,
    gaussian,
    morlet,
    wavelet_bank,
)
from fedfuse.models.spec import ModelSpec


def schema(c: int, h: int, w: int) -> DataSchema:
    return DataSchema((c, h, w), tuple(f"p{i}" for i in range(c * h * w)),
                      tuple(str(i) for i in range(10)))


def test_filters_are_admissible_and_the_lowpass_has_unit_gain():
    """Every wavelet sums to zero (so it ignores a constant image) and the low-pass to
    one; real and imaginary parts come in that order, L of each."""
    for j in range(3):
        for t in range(8):
            psi = morlet(j, math.pi * t / 8, 0.5)
            assert abs(psi.sum()) < 1e-12
            assert np.abs(psi).max() > 1e-3
        assert abs(gaussian(0.8 * 2 ** j).sum() - 1.0) < 1e-12
    bank = wavelet_bank(1, 8)
    assert bank.shape == (16, 1, 21, 21)
    np.testing.assert_allclose(bank[:8].numpy(), np.stack(
        [morlet(1, math.pi * t / 8, 0.5).real for t in range(8)])[:, None], atol=1e-7)


def test_output_shape_count_and_constant_images():
    """81 maps per channel at J = 2 (1 + 2·8 + 64), at a quarter of the side rounded up;
    a constant image has its value as order 0 and no energy above it."""
    assert coefficients(2, 8) == 81 and coefficients(3, 8) == 217 and coefficients(1, 4) == 5
    s = Scattering2D(3, 30, 32, scales=2)
    assert s.out_channels == 243
    assert s(torch.zeros(2, 3, 30, 32)).shape == (2, 243, 8, 8)
    flat = Scattering2D(1, 28, 28)(torch.full((1, 1, 28, 28), 0.7))
    np.testing.assert_allclose(flat[0, 0].numpy(), 0.7, atol=1e-5)
    assert float(flat[0, 1:].abs().max()) < 1e-5


def test_a_grating_excites_the_wavelet_of_its_orientation():
    """A cosine grating at the finest wavelet's frequency along orientation k puts the
    largest first-order coefficient of scale 0 at orientation k."""
    s = Scattering2D(1, 28, 28)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    for k in range(8):
        theta = math.pi * k / 8
        image = np.cos(XI0 * (xx * math.cos(theta) + yy * math.sin(theta)))
        out = s(torch.tensor(image, dtype=torch.float32)[None, None])
        first = out[0, 1:9].mean(dim=(1, 2))  # S1 at j1 = 0, one per orientation
        assert int(first.argmax()) == k, (k, first)


def test_channels_are_transformed_apart():
    """Channel c's maps are channel c's transform alone, in channel order."""
    s = Scattering2D(2, 16, 16)
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    both = s(x)
    one = Scattering2D(1, 16, 16)
    torch.testing.assert_close(both[:, :81], one(x[:, :1]))
    torch.testing.assert_close(both[:, 81:], one(x[:, 1:]))


def test_nothing_in_it_is_trained_or_carried_and_small_inputs_are_refused():
    s = Scattering2D(1, 28, 28)
    assert list(s.parameters()) == [] and s.state_dict() == {}
    with pytest.raises(ValueError, match="8x8 input is too small for a scattering of 2 "
                                         "scales: a 21x21 filter meets a 8-pixel map"):
        Scattering2D(1, 8, 8)
    with pytest.raises(ValueError, match="scales >= 1"):
        Scattering2D(1, 28, 28, scales=0)


def test_the_builtins_on_large_images_start_with_the_scattering():
    """On 28x28 the default ``cnn`` is the scattering (81 maps of 7x7), a GroupNorm
    without parameters, one block of 16 channels and a zero read-out; ``logreg`` and
    ``mlp`` read the same features. State dicts hold only what is trained and the input
    standardisation. ``channels = []`` gives ScatterNet+linear; a cohort may turn the
    scattering off; tabular data never get one."""
    model = build_model("cnn", schema(1, 28, 28))
    front = list(model[1].front)
    assert isinstance(front[0], Scattering2D)
    assert isinstance(front[1], nn.GroupNorm) and front[1].num_groups == 27
    assert not front[1].affine
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [16]
    assert set(model.state_dict()) == {"0.mean", "0.std", "1.features.0.weight",
                                       "1.features.0.bias", "1.head.1.weight",
                                       "1.head.1.bias"}
    assert sum(p.numel() for p in model.parameters()) == 81 * 16 * 9 + 16 + 144 * 10 + 10
    logreg = build_model("logreg", schema(1, 28, 28))
    assert isinstance(logreg[1].front[0], Scattering2D)
    assert set(logreg.state_dict()) == {"0.mean", "0.std", "1.linear.weight", "1.linear.bias"}
    assert logreg[1].linear.in_features == 81 * 49
    mlp = build_model("mlp", schema(1, 28, 28))
    assert mlp[1].net[0].in_features == 81 * 49 and mlp(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    linear = build_model(ModelSpec("cnn", {"channels": []}), schema(1, 28, 28))
    assert len(linear[1].features) == 0 and linear[1].head[1].in_features == 81 * 49
    plain = build_model(ModelSpec("cnn", {"scattering": 0, "channels": [16, 32]}),
                        schema(1, 28, 28))
    assert not any(isinstance(m, Scattering2D) for m in plain.modules())
    with pytest.raises(ConfigError, match=r"channels must be .* \(empty only after a "
                                          r"scattering\), got \[\]"):
        build_model(ModelSpec("cnn", {"scattering": 0, "channels": []}), schema(1, 28, 28))
    pixels = build_model(ModelSpec("logreg", {"scattering": 0}), schema(1, 28, 28))
    assert pixels[1].linear.in_features == 784
    tabular = DataSchema((30,), tuple(f"f{i}" for i in range(30)), ("a", "b"))
    assert not any(isinstance(m, Scattering2D) for m in build_model("mlp", tabular).modules())
    with pytest.raises(ConfigError, match=r"scattering needs image input \(C, H, W\); the "
                                          r"data have shape \(30,\)"):
        build_model(ModelSpec("logreg", {"scattering": 2}), tabular)


def test_dp_sgd_trains_it_with_per_sample_gradients():
    """Opacus accepts the model as it is and trains it: the loss on a learnable task
    falls under DP-SGD, and the scattering's filters are unchanged."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", {"channels": [8]}), schema(1, 16, 16), seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    before = model[1].front[0].psi0.clone()
    X = torch.randn(256, 1, 16, 16)
    y = (X[:, 0, :, :8].mean(dim=(1, 2)) > X[:, 0, :, 8:].mean(dim=(1, 2))).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y),
                                         batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5,
        max_grad_norm=1.0)
    loss = nn.CrossEntropyLoss()
    first = last = 0.0
    for epoch in range(6):
        total = 0.0
        for xb, yb in loader:
            opt.zero_grad()
            out = loss(model(xb), yb)
            out.backward()
            opt.step()
            total += float(out.detach()) * len(yb)
        first, last = (total, last) if epoch == 0 else (first, total)
    assert last < 0.8 * first
    torch.testing.assert_close(model._module[1].front[0].psi0, before)


def test_a_model_with_the_scattering_exports_to_onnx(tmp_path):
    """The transform is plain convolutions: the exported graph gives the model's own
    logits in onnxruntime, for a batch size other than the example's."""
    import onnxruntime as ort

    from fedfuse.artifact.export import export_onnx

    model = build_model("cnn", schema(1, 28, 28), seed=0).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    export_onnx(model, torch.rand(4, 1, 28, 28), tmp_path / "m.onnx", int8=False)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    x = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)
