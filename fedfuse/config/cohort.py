"""A ``[[cohorts]]`` entry: the clients (or named partner sites) that train one model,
averaged together, and what builds that model (``fedfuse.models.spec``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedfuse.config.sections import SITE_NAME, check
from fedfuse.models.spec import (
    ENTRY_POINTS,
    IMPORT_PATH,
    ModelSpec,
    default_name,
    registered,
)


@dataclass
class CohortConfig:
    """Clients sharing one architecture; they are averaged together."""

    arch: str
    """A built-in architecture (``logreg``, ``mlp``, ``cnn``), a user factory's import
    path, ``package.module:factory``, or the name an installed distribution registers
    one under (the ``fedfuse.architectures`` entry points), which becomes its import
    path when the scenario loads (docs/models.md)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword parameters of the architecture: ``factory(schema, **params)``, for
    example ``{hidden = 128}`` for ``mlp`` or ``{channels = [16, 32]}`` for ``cnn``."""
    fix: bool = False
    """Let Opacus's ``ModuleValidator.fix`` replace the layers DP-SGD cannot train
    (BatchNorm becomes GroupNorm); without it such a model is refused under DP."""
    name: str = ""
    """The cohort's name in logs, summaries and the artifact; default the built-in's or
    the factory's name. Two cohorts of one architecture need names of their own."""
    clients: int = 0
    """How many simulated clients train this architecture; with ``sites``, their number."""
    sites: list[str] | None = None
    """Deployment: the names of the partner sites in this cohort (each registered with
    ``fedfuse certs add-site``); a site trains the architecture of the cohort that lists
    it."""
    lr: float | None = None
    """Local learning rate; ``None`` takes the architecture's tuned default (a user
    factory's: 0.05, or 0.5 under DP)."""

    def __post_init__(self) -> None:
        path = None if self.model.problem() is None else registered(self.arch)
        if path is not None:
            check(bool(IMPORT_PATH.match(path)), "arch", f"the entry point {self.arch!r} "
                  f"of {ENTRY_POINTS!r} names {path!r}, not a 'package.module:factory' path")
            self.name, self.arch = self.name or self.arch, path
        problem = self.model.problem()
        check(problem is None, "arch", problem or "")
        self.name = self.name or default_name(self.arch)
        check(bool(SITE_NAME.match(self.name)), "name", f"{self.name!r} is not a valid "
              "cohort name: use 1-63 letters, digits, '_', '.' or '-'")
        if self.sites is not None:
            check(len(self.sites) >= 1, "sites", "must list at least one site")
            check(len(set(self.sites)) == len(self.sites), "sites", "lists a site twice")
            for name in self.sites:
                check(bool(SITE_NAME.match(name)), "sites", f"{name!r} is not a valid site "
                       "name: use 1-63 letters, digits, '_', '.' or '-'")
            check(self.clients in (0, len(self.sites)), "clients",
                   f"is {self.clients} but sites lists {len(self.sites)}; drop clients")
            self.clients = len(self.sites)
        check(self.clients >= 1, "clients", "must be >= 1 (or list the cohort's sites)")
        check(self.lr is None or self.lr > 0.0, "lr", "must be > 0")

    @property
    def model(self) -> ModelSpec:
        return ModelSpec(self.arch, self.params, self.fix)
