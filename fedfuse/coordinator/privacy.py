"""What the coordinator learns of the sites' privacy: each site's latest report.

Under record-level DP every train reply carries the site's figures (``fedfuse.privacy.
budget.report``); a site whose next round would exceed its budget answers with the
report alone, and the coordinator stops sampling it. Under client-level DP the cohort's
strategy keeps the account (``fedfuse.strategies.client_dp``) and reports for every
member.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Message

from fedfuse.coordinator.cohorts import Cohort
from fedfuse.strategies import ClientLevelDP

log = logging.getLogger("fedfuse.coordinator")


class SiteReports:
    """Each site's latest privacy report, by node id."""

    def __init__(self) -> None:
        self.by_node: dict[int, dict[str, Any]] = {}

    def collect(self, cohort: Cohort, replies: list[Message],
                server_round: int) -> list[Message]:
        """Record the reports in ``replies``; retire (stop sampling) the sites whose
        budget is exhausted. Returns the replies that carry an update."""
        names = {p.node_id: p.name for p in cohort.participants}
        updates = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if not reply.has_error() and "privacy" in reply.content:
                self.by_node[node] = dict(reply.content["privacy"])
                if self.by_node[node]["status"] == "budget-exhausted":
                    cohort.strategy.retire(node)
                    log.warning("round %d: %s stops training: its next round would exceed "
                                "its privacy budget (ε %.3f of %.3f spent)", server_round,
                                names.get(node, node), self.by_node[node]["epsilon"],
                                self.by_node[node]["budget"])
                    continue
            updates.append(reply)
        return updates

    def update_from(self, cohort: Cohort) -> None:
        """Take in the cohort strategy's own reports (client-level DP)."""
        if isinstance(cohort.strategy, ClientLevelDP):
            self.by_node.update({n: dict(r) for n, r in cohort.strategy.reports.items()})

    def max_epsilon(self, cohort: Cohort) -> float | None:
        """The largest ε reported by a site of ``cohort`` (0 if none of them has
        reported yet), or None before any site has."""
        if not self.by_node:
            return None
        return max((float(self.by_node[p.node_id]["epsilon"]) for p in cohort.participants
                    if p.node_id in self.by_node), default=0.0)
