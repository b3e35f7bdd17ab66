"""Where tensors live: ``cpu``, ``cuda``, ``cuda:N``, or ``auto``.

A device name is checked for its form when a config is read (:func:`check_device_name`)
and resolved on the machine that uses it (:func:`resolve_device`): a site's GPU is a
fact about the site, a server's about the server.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from fedfuse.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved, not by config checks
    import torch

DEVICE_NAMES = "'cpu', 'cuda', 'cuda:N' (N: a GPU's index) or 'auto'"
_FORM = re.compile(r"cpu|cuda(:\d+)?|auto")


def check_device_name(name: str, key: str) -> None:
    """Refuse a device name that is none of :data:`DEVICE_NAMES`, naming ``key``."""
    if not _FORM.fullmatch(name):
        raise ConfigError(key, f"{name!r} is not a device; use {DEVICE_NAMES}")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """The torch device ``name`` stands for on this machine; ``auto`` is the first GPU
    when PyTorch sees one, else the CPU. A GPU this machine lacks is refused, naming
    ``key``, instead of failing later inside training."""
    import torch

    check_device_name(name, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(key, f"{name!r}: PyTorch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}, CUDA build: "
                              f"{torch.version.cuda or 'none'}); use 'cpu' or 'auto'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(key, f"{name!r}: this machine has {count} CUDA GPU(s), "
                              f"numbered 0..{count - 1}")
    return device


def ray_gpus(name: str) -> int:
    """The GPUs to give Ray's simulation engine for device ``name``: every one PyTorch
    sees here when ``name`` is a GPU, else none."""
    import torch

    return torch.cuda.device_count() if resolve_device(name).type == "cuda" else 0


def worker_device(name: str) -> str:
    """The device a simulated client names inside its Ray worker: the worker sees only
    the GPU Ray gave it, as ``cuda``, whatever index ``name`` holds."""
    return "cuda" if name.startswith("cuda") else name


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda:N (<GPU name>)``: what benchmark tables record."""
    import torch

    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (the CPU for a model without any)."""
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
