"""From a :class:`ModelSpec` to a model: the built-ins' classes or a user factory,
imported only where the caller allows it, and checked before any run starts.

A user factory is ``factory(schema, **params) -> torch.nn.Module`` mapping
``(batch, *schema.input_shape)`` to ``(batch, schema.num_classes)`` logits. Importing it
runs its module's code, so every entry point says whose code may run
(:class:`CodeAllowance`): a simulation or coordinator runs its own scenario's
(:data:`OWN_CODE`), a deployed site only what its operator allowed, a model server only
what its ``--allow-arch`` names. The refusal comes before the import.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedfuse.data.datasets import DataSchema
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.spec import CodeAllowance, ModelSpec, allowed

log = logging.getLogger(__name__)

DUMMY_BATCH = 2


class CodeNotAllowed(FedfuseError):
    """An architecture's import path that this process may not import."""


def factory_of(spec: ModelSpec, code: CodeAllowance,
               key: str = "arch") -> Callable[..., nn.Module]:
    """The callable that builds ``spec``'s model body; refuses an invalid or disallowed
    reference before importing anything, then a module that does not import, a missing
    or non-callable factory, and one whose signature does not take
    ``(schema, **spec.params)``."""
    from fedfuse.models.registry import REGISTRY

    problem = spec.problem()
    if problem:
        raise ConfigError(key, problem)
    if spec.is_builtin:
        factory: Callable[..., nn.Module] = REGISTRY[spec.arch].build
    else:
        if not allowed(spec, code.paths):
            raise CodeNotAllowed(f"{key}: architecture {spec.arch!r} is not allowed to run "
                                 f"here: only the built-ins and the import paths allowed "
                                 f"({', '.join(code.paths or ()) or 'none'}) are imported"
                                 + (f"; {code.how}" if code.how else ""))
        factory = _import(spec, code.search, key)
    check_signature(factory, spec, key)
    return factory


def _import(spec: ModelSpec, search: str | None, key: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.arch.partition(":")
    added = search is not None and search not in sys.path
    if added:
        sys.path.insert(0, str(search))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = f" or {search}" if search else ""
        raise ConfigError(key, f"cannot import module {module_name!r} ({exc}): install it, "
                          f"or put {module_name.replace('.', '/')}.py on the Python path"
                          f"{where}") from None
    except Exception as exc:  # the user's module failed while it ran
        raise ConfigError(key, f"importing module {module_name!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(search))
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(key, f"module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise ConfigError(key, f"{spec.arch!r} is a {type(factory).__name__}, not a callable "
                          "factory(schema, **params)")
    return factory


def sibling(key: str, name: str) -> str:
    """The key ``name`` beside ``key`` in its table (``cohorts[0].arch`` -> ``cohorts[0].fix``)."""
    table, dot, _ = key.rpartition(".")
    return f"{table}{dot}{name}"


def check_signature(factory: Callable[..., Any], spec: ModelSpec, key: str) -> None:
    """Refuse a factory that cannot be called as ``factory(schema, **spec.params)``."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # a builtin or extension callable: the call itself will tell
    try:
        signature.bind(None, **spec.params)
    except TypeError as exc:
        raise ConfigError(sibling(key, "params"),
                          f"{spec.arch!r} cannot be called as factory(schema, "
                          f"**{spec.params!r}): {exc} (its signature is {signature})") from None


def make_body(spec: ModelSpec, schema: DataSchema, code: CodeAllowance,
              key: str = "arch") -> nn.Module:
    """``factory(schema, **params)``, checked to be a module; with ``spec.fix``, passed
    through Opacus's ``ModuleValidator.fix`` (which replaces BatchNorm by GroupNorm)."""
    from fedfuse.models.registry import resolved

    spec = resolved(spec, schema)
    factory = factory_of(spec, code, key)
    try:
        body = factory(schema, **spec.params)
    except Exception as exc:
        raise ConfigError(key, f"{spec.arch!r} failed to build a model for input "
                          f"{tuple(schema.input_shape)} and {schema.num_classes} classes: "
                          f"{type(exc).__name__}: {exc}") from None
    if not isinstance(body, nn.Module):
        raise ConfigError(key, f"{spec.arch!r} returned a {type(body).__name__}, not a "
                          "torch.nn.Module")
    if spec.fix:
        from opacus.validators import ModuleValidator

        if ModuleValidator.validate(body, strict=False):
            body = ModuleValidator.fix(body)
            log.warning("%s: Opacus's ModuleValidator.fix replaced the layers DP-SGD cannot "
                        "train in %s (BatchNorm becomes GroupNorm)", key, spec.arch)
    return body


def check_body(body: nn.Module, spec: ModelSpec, schema: DataSchema, key: str,
               private: bool) -> None:
    """Refuse a model that fails on a dummy batch of the schema's shape, whose output is
    not ``(batch, num_classes)`` logits, or (``private``) that DP-SGD cannot train."""
    shape = (DUMMY_BATCH, *schema.input_shape)
    try:
        with torch.no_grad():
            out = body.eval()(torch.zeros(shape))
    except Exception as exc:
        raise ConfigError(key, f"the model of {spec.arch!r} fails on a dummy batch of shape "
                          f"{shape}: {type(exc).__name__}: {exc}") from None
    finally:
        body.train()
    want = (DUMMY_BATCH, schema.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(key, f"the model of {spec.arch!r} maps a batch of shape {shape} to "
                          f"{got}; it must output {want} logits (batch, num_classes)")
    if private:
        check_dp_body(body, spec, key)


def check_dp_body(body: nn.Module, spec: ModelSpec, key: str) -> None:
    """Refuse a model with layers per-sample clipping cannot handle (Opacus's
    ``ModuleValidator``): BatchNorm mixes the examples of a batch."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(body, strict=False)
    if not errors:
        return
    found = "; ".join(sorted({str(e) for e in errors}))
    fix_key = sibling(key, "fix")
    if "BatchNorm" in found:
        raise ConfigError(key, f"the model of {spec.arch!r} uses BatchNorm, which DP-SGD "
                          f"cannot train (it mixes the examples whose gradients are clipped "
                          f"one by one): use GroupNorm or LayerNorm, or set {fix_key} = true "
                          f"to let Opacus replace it; Opacus says: {found}")
    raise ConfigError(key, f"the model of {spec.arch!r} cannot be trained with DP-SGD: "
                      f"{found}; set privacy.mode = \"off\" or change the model")


def code_identity(spec: ModelSpec) -> dict[str, str]:
    """What identifies a user factory's code: its module file's SHA-256 and, when the
    module belongs to an installed distribution, that distribution's version."""
    if spec.is_builtin:
        return {}
    module = sys.modules.get(spec.module)
    found: dict[str, str] = {}
    path = getattr(module, "__file__", None)
    if path and Path(path).is_file():
        found["module_sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    top = spec.module.partition(".")[0]
    for dist in metadata.packages_distributions().get(top, [])[:1]:
        found["distribution"] = f"{dist}=={metadata.version(dist)}"
    return found
