"""A site's privacy policy: what it releases, whatever the coordinator asks.

The scenario's ``[privacy]`` and ``[secure_aggregation]`` reach a site as a request in
every train message; the policy, a TOML file of the site's own (``fedfuse site
--policy FILE``), is the law. Every train and fusion-statistics message is checked
against it before any training or statistic is computed, and one that would break it is
refused: the reply is an error naming the rule, and no weights leave the site.

Without a file the default policy applies, and it is the safe one: record-level DP
required, a lifetime budget of ε ≤ 8 (about one run of the default deployment scenario,
``simulations/deploy.toml``) over every run and coordinator (the site's ledger keeps it),
secure aggregation required, and masked sums over at least 3 members.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fedfuse.config.loading import build
from fedfuse.errors import ConfigError, FedfuseError
from fedfuse.models.spec import ALLOW_ENTRY
from fedfuse.wire import POLICY_REFUSAL

DP_LEVELS = ("record", "client", "none")


class PolicyRefusal(FedfuseError):
    """A request the site's policy does not allow; the message names the rule."""

    def __init__(self, rule: str, why: str) -> None:
        super().__init__(f"{POLICY_REFUSAL} ({rule}): {why}")
        self.rule = rule


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows (module docstring); the defaults are the safe policy."""

    require_dp: Literal["record", "client", "none"] = "record"
    """"record": record-level DP-SGD at the site (its own noise). "client" also accepts
    client-level DP, whose noise the coordinator draws, so it does not protect the site
    from the coordinator. "none": training without DP is allowed."""
    max_epsilon: float = 8.0
    """The site's lifetime ε budget, across all runs and coordinators (its ledger)."""
    max_delta: float | None = None
    """The largest δ a request may set (None: any δ below 1/n, the ledger's own rule)."""
    require_secure_aggregation: bool = True
    """Updates and statistics leave the site only masked."""
    min_cohort_size: int = 3
    """The fewest members a masked sum may be over (two would reveal each other)."""
    verify_keys: bool = True
    """Share only with members whose per-session keys carry their identity's signature
    (a coordinator substituting a member's keys cannot sign them)."""
    require_consistency_check: bool = True
    """Reveal shares only after a consistency check certifies the survivors, and share
    only with a threshold above 2/3 (``fedfuse.secagg.consistency``): a coordinator
    cannot then learn a member's update by lying about who dropped."""
    peers: tuple[str, ...] = ()
    """Pinned identities (hex Ed25519 public keys, ``fedfuse site init`` prints each
    site's): if any, every member of a session must have one of them; unpinned, a
    coordinator could still present identities of its own making (Sybils)."""

    allow_arch: tuple[str, ...] = ()
    """User model code the site imports (``package.module:factory``, or
    ``package.module:*`` for every factory of a module); the built-ins always run, any
    other import path a scenario names is refused before it is imported."""

    @property
    def pinned(self) -> frozenset[bytes]:
        return frozenset(bytes.fromhex(p) for p in self.peers)

    def __post_init__(self) -> None:
        if self.require_dp not in DP_LEVELS:
            raise FedfuseError(f"policy require_dp must be one of {', '.join(DP_LEVELS)}, "
                               f"got {self.require_dp!r}")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise FedfuseError(f"policy max_epsilon must be a number > 0, got "
                               f"{self.max_epsilon}")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise FedfuseError(f"policy max_delta must be in (0, 1), got {self.max_delta}")
        if any(len(p) != 64 or not all(c in "0123456789abcdefABCDEF" for c in p)
               for p in self.peers):
            raise FedfuseError("policy peers must be hex Ed25519 public keys (64 hex "
                               "digits each, as `fedfuse site init` prints them)")
        bad = [a for a in self.allow_arch if not ALLOW_ENTRY.match(a)]
        if bad:
            raise FedfuseError(f"policy allow_arch entry {bad[0]!r} is not an import path "
                               "'package.module:factory' or 'package.module:*'")
        if self.min_cohort_size < 3:
            raise FedfuseError(f"policy min_cohort_size must be at least 3 (a sum over two "
                               f"reveals each to the other), got {self.min_cohort_size}")

    def summary(self) -> str:
        """One line for the site's start-up message."""
        dp = {"record": "record-level DP required", "client": "record- or client-level DP "
              "required", "none": "DP not required"}[self.require_dp]
        secure = (f"secure aggregation over at least {self.min_cohort_size} members required"
                  if self.require_secure_aggregation else "plaintext updates allowed")
        code = ", ".join(self.allow_arch) or "built-ins only"
        return (f"{dp}, lifetime ε ≤ {self.max_epsilon:g} (about one default run at "
                f"ε 8), {secure}, model code: {code}")

    def allowing(self, paths: tuple[str, ...]) -> SitePolicy:
        """This policy, also allowing the import paths ``paths`` (``--allow-arch``)."""
        return replace(self, allow_arch=tuple(dict.fromkeys(self.allow_arch + paths)))


def load_policy(path: Path | None) -> SitePolicy:
    """The policy in the TOML file ``path`` (None: the default policy), read as the
    scenario is (``fedfuse.config.loading.build``): unknown keys and values of the wrong
    type are refused with the key named."""
    if path is None:
        return SitePolicy()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FedfuseError(f"cannot read the site policy {path}: {exc}") from None
    try:
        policy: SitePolicy = build(SitePolicy, raw, "")
    except ConfigError as exc:
        raise FedfuseError(f"{path}: policy {exc.key}: {exc.message}") from None
    return policy


def check_train(policy: SitePolicy, config: Any, masking: Any | None) -> None:
    """Raise PolicyRefusal unless a train message with ``config`` (its ConfigRecord) and
    ``masking`` (its secure-aggregation request, None without one) is allowed."""
    mode = str(config.get("dp-mode", "off"))
    if policy.require_dp == "record" and mode != "sample":
        raise PolicyRefusal("require_dp", f"the request trains with dp-mode {mode!r}; this "
                            "site trains only with record-level DP (dp-mode 'sample')")
    if policy.require_dp == "client" and mode not in ("sample", "user"):
        raise PolicyRefusal("require_dp", f"the request trains with dp-mode {mode!r}; this "
                            "site requires DP")
    if mode == "sample":
        budget = config.get("dp-budget", config.get("dp-target-epsilon"))
        if budget is not None and float(budget) > policy.max_epsilon:
            raise PolicyRefusal("max_epsilon", f"the request's ε budget {float(budget):g} is "
                                f"above the site's lifetime {policy.max_epsilon:g}")
        delta = config.get("dp-delta")
        if policy.max_delta is not None and delta is not None and \
                float(delta) > policy.max_delta:
            raise PolicyRefusal("max_delta", f"the request's δ {float(delta):g} is above "
                                f"{policy.max_delta:g}")
    check_masking(policy, masking)


def check_masking(policy: SitePolicy, masking: Any | None) -> None:
    """Raise PolicyRefusal unless what would leave is masked as the policy requires, in
    a sum over at least ``min_cohort_size`` members."""
    if masking is None:
        if policy.require_secure_aggregation:
            raise PolicyRefusal("require_secure_aggregation", "the request asks for "
                                "plaintext; this site sends only masked vectors")
        return
    members = masking.get("nodes", [])
    if len(members) < policy.min_cohort_size:
        raise PolicyRefusal("min_cohort_size", f"the masked sum would be over "
                            f"{len(members)} members, fewer than {policy.min_cohort_size}")


def capped_budget(policy: SitePolicy, requested: float | None) -> float:
    """The ε budget the site's ledger keeps: the request's, never above the policy's."""
    return policy.max_epsilon if requested is None else min(requested, policy.max_epsilon)
