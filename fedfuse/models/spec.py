"""What builds a cohort's model: :class:`ModelSpec`, a built-in architecture's short name
or a user factory's import path, with its keyword parameters.

Plain data (no torch), so the scenario can hold it and the artifact's manifest can record
it; ``fedfuse.models.factory`` turns a spec into a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

BUILTINS = ("logreg", "mlp", "cnn")
"""The built-in architectures (``fedfuse.models.registry``): always allowed, everywhere."""

_MODULE, _NAME = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", r"[A-Za-z_]\w*"
IMPORT_PATH = re.compile(f"^{_MODULE}:{_NAME}$")
"""``package.module:factory``: dotted module name, a colon, the factory's name."""

ALLOW_ENTRY = re.compile(f"^{_MODULE}:({_NAME}|\\*)$")
"""An allow-list entry: an import path, or ``package.module:*`` for a whole module."""

ENTRY_POINTS = "fedfuse.architectures"
"""The entry-point group under which an installed distribution registers architectures
by name: ``tiny = "mypkg.models:tiny"`` in its pyproject.toml's
``[project.entry-points."fedfuse.architectures"]``."""


@dataclass
class ModelSpec:
    """A built-in name (``mlp``) or an import path (``package.module:factory``), the
    keyword parameters passed to it (``factory(schema, **params)``), and whether Opacus's
    ``ModuleValidator.fix`` may replace layers DP-SGD cannot train (BatchNorm)."""

    arch: str
    params: dict[str, Any] = field(default_factory=dict)
    fix: bool = False

    @property
    def is_builtin(self) -> bool:
        return self.arch in BUILTINS

    @property
    def module(self) -> str:
        """The module an import path names (empty for a built-in)."""
        return "" if self.is_builtin else self.arch.partition(":")[0]

    def problem(self) -> str | None:
        """Why this is not a valid reference, or ``None``."""
        if self.is_builtin or IMPORT_PATH.match(self.arch):
            return None
        return (f"{self.arch!r} is neither a built-in architecture ({', '.join(BUILTINS)}), "
                f"nor an architecture an installed distribution registers under the "
                f"{ENTRY_POINTS!r} entry points, nor an import path of the form "
                "'package.module:factory'")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "params": dict(self.params), "fix": self.fix}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(str(d["arch"]), dict(d.get("params", {})), bool(d.get("fix", False)))


def registered(name: str) -> str | None:
    """The import path an installed distribution registers ``name`` under in the
    :data:`ENTRY_POINTS` group, or ``None``. Reads package metadata only: nothing is
    imported, so the allow-lists still apply to the path it returns."""
    for entry in metadata.entry_points(group=ENTRY_POINTS, name=name):
        return f"{entry.module}:{entry.attr}" if entry.attr else entry.value
    return None


def default_name(arch: str) -> str:
    """A cohort's name when the scenario gives none: the built-in's name, or the
    factory's (``models.cnn:small`` -> ``small``)."""
    return arch.rpartition(":")[2]


def allowed(spec: ModelSpec, allow: tuple[str, ...] | None) -> bool:
    """Whether code for ``spec`` may run: built-ins always; an import path when ``allow``
    is ``None`` (the caller's own scenario) or lists it, or lists its module as
    ``package.module:*``."""
    if spec.is_builtin or allow is None:
        return True
    return spec.arch in allow or f"{spec.module}:*" in allow


@dataclass(frozen=True)
class CodeAllowance:
    """Whose model code may be imported: ``paths`` lists the allowed import paths
    (``package.module:factory``, or ``package.module:*`` for a whole module), ``None``
    allows any; ``how`` says how an operator allows one, for the refusal's message."""

    paths: tuple[str, ...] | None
    how: str = ""
    search: str | None = None
    """A directory searched before ``sys.path`` (the scenario's own, for its author)."""


OWN_CODE = CodeAllowance(None)
"""The caller's own scenario: any import path, from the Python path."""
