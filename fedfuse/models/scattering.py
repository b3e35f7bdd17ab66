"""A fixed 2-D scattering transform (Mallat 2012; Bruna & Mallat 2013): wavelet
features with no trainable parameters, the front end of the DP-SGD literature's
"ScatterNet" models (Tramèr & Boneh 2021). Under DP-SGD every trained parameter receives
noise; a scattering transform's filters are fixed, so the features cost no privacy and
the trained part stays small.

With Morlet wavelets ``ψ_{j,θ}`` (scale ``2^j``, ``L`` orientations) and a Gaussian
low-pass ``φ_J``, the coefficients of order 0, 1 and 2 of one image channel ``x`` are

    S0 x            = x ⋆ φ_J
    S1 x (j1, θ1)   = |x ⋆ ψ_{j1,θ1}| ⋆ φ_J
    S2 x (j1 < j2)  = ||x ⋆ ψ_{j1,θ1}| ⋆ ψ_{j2,θ2}| ⋆ φ_J

each subsampled by ``2^J``: ``1 + J L + L² J (J - 1) / 2`` maps per channel (81 for
``J = 2``, ``L = 8``) of ``ceil(H / 2^J) × ceil(W / 2^J)``. A map at scale ``2^j`` is
computed at that resolution (stride ``2^j``), where its next wavelet ``ψ_{j2}`` is the
unit-grid wavelet of scale ``j2 - j``. Convolutions are spatial (``conv2d`` with
reflection padding), so a model that contains the transform exports to ONNX like any
other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIGMA0 = 0.8
"""Envelope width of the finest wavelet, in pixels; scale j has ``0.8 · 2^j``."""
XI0 = 3.0 * math.pi / 4.0
"""Centre frequency of the finest wavelet (radians per pixel); scale j has ``XI0 / 2^j``."""
TRUNCATE = 3.0
"""Kernels are cut at this many envelope widths from their centre."""


def coefficients(scales: int, orientations: int) -> int:
    """Maps per input channel: ``1 + J L + L² J (J - 1) / 2``."""
    return 1 + scales * orientations + orientations ** 2 * scales * (scales - 1) // 2


def _grid(half: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(-half, half + 1, dtype=np.float64)
    return np.meshgrid(r, r, indexing="ij")


def gaussian(sigma: float) -> np.ndarray:
    """``φ(u) = exp(-|u|² / 2σ²)``, normalised to sum 1 (a low-pass of unit gain)."""
    yy, xx = _grid(math.ceil(TRUNCATE * sigma))
    g = np.exp(-(yy ** 2 + xx ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def morlet(scale: int, theta: float, slant: float) -> np.ndarray:
    """``ψ(u) = g(u) (exp(i ξ·u) - β) / (2π σ² / s)``, complex: an elliptic Gaussian
    envelope ``g(u) = exp(-(u_∥² + s² u_⊥²) / 2σ²)`` (``u_∥`` along the direction θ of
    the wave vector ``ξ = ξ_j (cos θ, sin θ)``; ``σ = 0.8 · 2^j``, ``ξ_j = 3π/4 / 2^j``,
    slant ``s``) and ``β = Σ g exp(i ξ·u) / Σ g``, so that ``Σ ψ = 0``."""
    sigma, xi = SIGMA0 * 2 ** scale, XI0 / 2 ** scale
    yy, xx = _grid(math.ceil(TRUNCATE * sigma / slant))
    along = xx * math.cos(theta) + yy * math.sin(theta)
    across = -xx * math.sin(theta) + yy * math.cos(theta)
    g = np.exp(-(along ** 2 + (slant * across) ** 2) / (2.0 * sigma ** 2))
    wave = np.exp(1j * xi * along)
    beta = (g * wave).sum() / g.sum()
    return g * (wave - beta) / (2.0 * math.pi * sigma ** 2 / slant)


def wavelet_bank(scale: int, orientations: int) -> torch.Tensor:
    """The real parts, then the imaginary parts, of the ``L`` wavelets of one scale:
    a ``(2L, 1, k, k)`` float32 kernel."""
    kernels = [morlet(scale, math.pi * t / orientations, 4.0 / orientations)
               for t in range(orientations)]
    parts = [k.real for k in kernels] + [k.imag for k in kernels]
    return torch.tensor(np.stack(parts)[:, None], dtype=torch.float32)


class Scattering2D(nn.Module):
    """The scattering transform of order 2 at ``scales`` = J and ``orientations`` = L of
    ``(batch, channels, H, W)`` input: ``(batch, channels · K, ceil(H / 2^J),
    ceil(W / 2^J))`` with ``K = coefficients(J, L)``, channel by channel. Its filters
    are buffers, not parameters (nothing in it is trained), and not persistent: they
    are made here from the formulas, never read from a state dict, so no update, message
    or artifact carries them."""

    def __init__(self, channels: int, height: int, width: int, scales: int = 2,
                 orientations: int = 8) -> None:
        super().__init__()
        if scales < 1 or orientations < 1:
            raise ValueError(f"scattering needs scales >= 1 and orientations >= 1, got "
                             f"{scales} and {orientations}")
        self.scales, self.orientations = scales, orientations
        for j in range(scales):
            self.register_buffer(f"psi{j}", wavelet_bank(j, orientations), persistent=False)
        for j in range(1, scales + 1):
            self.register_buffer(f"phi{j}", torch.tensor(
                gaussian(SIGMA0 * 2 ** (j - 1))[None, None], dtype=torch.float32),
                persistent=False)
        self.out_channels = channels * coefficients(scales, orientations)
        for kernel, size in self._reach(height, width):
            if kernel // 2 >= size:
                raise ValueError(f"a {height}x{width} input is too small for a scattering "
                                 f"of {scales} scales: a {kernel}x{kernel} filter meets a "
                                 f"{size}-pixel map (use fewer scales)")

    def _reach(self, height: int, width: int) -> list[tuple[int, int]]:
        """(kernel side, side of the map it meets) of every convolution the transform
        runs: ψ_{j1} on the input, ψ_{j2 - j1} on maps at scale ``2^j1``, and φ_J on
        maps at every scale below J."""
        side = min(height, width)
        uses = [(f"psi{j1}", side) for j1 in range(self.scales)]
        uses += [(f"psi{j2 - j1}", math.ceil(side / 2 ** j1))
                 for j1 in range(self.scales) for j2 in range(j1 + 1, self.scales)]
        uses += [(f"phi{self.scales - r}", math.ceil(side / 2 ** r))
                 for r in range(self.scales)]
        return [(self.kernel(name).shape[-1], size) for name, size in uses]

    def kernel(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        maps = x.reshape(b * c, 1, h, w)
        out = [self._lowpass(maps, 0)]
        for j1 in range(self.scales):
            first = self._modulus(maps, j1)
            out.append(self._lowpass(first, j1))
            for j2 in range(j1 + 1, self.scales):
                out.append(self._lowpass(self._modulus(first, j2 - j1), j2))
        s = torch.cat(out, dim=1)
        return s.reshape(b, c * s.shape[1], s.shape[2], s.shape[3])

    def _modulus(self, u: torch.Tensor, scale: int) -> torch.Tensor:
        """``|u ⋆ ψ_{scale,θ}|`` for every map of ``u`` and orientation θ (the
        unit-grid wavelet of ``scale``), subsampled by ``2^scale``:
        ``(n, m, h, w) -> (n, m · L, h', w')``."""
        z = self._filter(u, f"psi{scale}", 2 ** scale)
        re, im = z[:, :, :self.orientations], z[:, :, self.orientations:]
        mod = (re * re + im * im).sqrt()
        return mod.reshape(u.shape[0], -1, mod.shape[-2], mod.shape[-1])

    def _lowpass(self, u: torch.Tensor, resolution: int) -> torch.Tensor:
        """``u ⋆ φ_J`` at the output resolution ``2^J`` from maps at ``2^resolution``."""
        s = self._filter(u, f"phi{self.scales - resolution}", 2 ** (self.scales - resolution))
        return s.reshape(u.shape[0], -1, s.shape[-2], s.shape[-1])

    def _filter(self, u: torch.Tensor, name: str, stride: int) -> torch.Tensor:
        """Every map of ``u`` ``(n, m, h, w)``, reflection-padded by half the kernel,
        correlated with each of kernel ``name``'s filters at ``stride``:
        ``(n, m, filters, h', w')``."""
        n, m, h, w = u.shape
        kernel = self.kernel(name)
        half = kernel.shape[-1] // 2
        flat = F.pad(u.reshape(n * m, 1, h, w), (half, half, half, half), mode="reflect")
        z = F.conv2d(flat, kernel, stride=stride)
        return z.reshape(n, m, z.shape[1], z.shape[2], z.shape[3])


def scatter_groups(maps: int) -> int:
    """GroupNorm groups over ``maps`` scattering maps: groups of 3 where 3 divides
    ``maps`` (27 for one channel's 81 maps at J = 2), else one map per group."""
    return maps // 3 if maps % 3 == 0 else maps


def front_end(input_shape: tuple[int, ...], scales: int
              ) -> tuple[nn.Sequential, tuple[int, ...]]:
    """A built-in's fixed front end and the shape of what it outputs: for ``scales`` =
    J > 0 the scattering transform of (C, H, W) input followed by a GroupNorm without
    parameters of :func:`scatter_groups` groups, ``(C · K, ceil(H / 2^J), ceil(W /
    2^J))``; for 0 nothing, and the input's own shape."""
    if not isinstance(scales, int) or scales < 0:
        raise ValueError(f"scattering must be a number of scales >= 0, got {scales!r}")
    if not scales:
        return nn.Sequential(), tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"scattering needs image input (C, H, W); the data have shape "
                         f"{tuple(input_shape)}")
    c, h, w = input_shape
    transform = Scattering2D(c, h, w, scales)
    maps = transform.out_channels
    return (nn.Sequential(transform, nn.GroupNorm(scatter_groups(maps), maps, affine=False)),
            (maps, -(-h // 2 ** scales), -(-w // 2 ** scales)))
