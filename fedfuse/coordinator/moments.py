"""The feature moments that standardise every cohort's inputs, pooled over the sites
(``fedfuse.data.stats``): from the discovery answers in plaintext, or, under secure
aggregation, from one secure sum over every site, so that only the totals leave them.

For the secure sum the coordinator sends a reference centre and scale per feature (the
mean and std of its own held-out data) and the clip bound B (``moments_bound``); each
site masks the fixed-point vector of its clipped standardised sums. A total that fails
its checks (a site sent a dishonest vector: a secure sum cannot name it), or a session
that does not complete, is not used: the coordinator then standardises with its own
held-out data's moments, and says so.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedfuse import wire
from fedfuse.coordinator.aggregation import Collector, SecureCollector
from fedfuse.coordinator.records import Participant
from fedfuse.data.stats import local_moments, mean_std_from_totals, pooled_mean_std
from fedfuse.secagg.encoding import FIXED_POINT_BITS, decode_fixed

log = logging.getLogger("fedfuse.coordinator")

MOMENTS = "+moments"
"""The tag and group of the moments' secure sum."""
QUERY = "query.moments"
"""The message type that asks a site for its masked standardised sums."""
MAX_BOUND = 1e4
"""The widest clip, in reference standard deviations."""


def moments_bound(total: int) -> float:
    """B = min(10^4, sqrt(2^62 / (2^24 N))): N values clipped to ±B keep the sum of
    their squares, in 24-bit fixed point, inside the signed 64-bit ring (with room for
    the sum's rounding)."""
    return min(MAX_BOUND, math.sqrt(2.0 ** 62 / (2.0 ** FIXED_POINT_BITS * max(total, 1))))


def standardisation(grid: Grid, collector: Collector, participants: list[Participant],
                    replies: list[Message], reference: np.ndarray, by_channel: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the union of the participants' training inputs: from their
    discovery ``replies``, or through a secure sum where ``collector`` is secure;
    ``reference``: the coordinator's held-out inputs; ``by_channel``: one mean and std
    per image channel (``fedfuse.data.stats.spread``)."""
    if not isinstance(collector, SecureCollector):
        moments = [wire.arrays(r, "moments") for r in replies]
        return pooled_mean_std([p.num_train for p in participants],
                               [wire.as_array(m, "sum") for m in moments],
                               [wire.as_array(m, "sumsq") for m in moments],
                               by_channel=by_channel)
    n, s, q = local_moments(reference)
    center, scale = (a.astype(np.float64) for a in pooled_mean_std([n], [s], [q],
                                                                   by_channel=by_channel))
    expected = sum(p.num_train for p in participants)
    bound = moments_bound(expected)
    content = RecordDict({"reference": ArrayRecord({"center": Array(center),
                                                    "scale": Array(scale)}),
                          "moments": ConfigRecord({"bound": bound})})
    msgs = [Message(content, dst_node_id=p.node_id, message_type=QUERY) for p in participants]
    summed = collector.secure_sum(grid, MOMENTS, msgs, 1 + 2 * center.size)
    why = "the secure sum did not complete"
    if summed is not None:
        try:
            return mean_std_from_totals(decode_fixed(summed[0]), center, scale, bound,
                                        expected, by_channel=by_channel)
        except ValueError as exc:
            why = f"the secure sum is rejected ({exc}): a site sent a dishonest vector"
    log.warning("feature moments: %s; every cohort standardises with the coordinator's "
                "held-out data instead", why)
    return pooled_mean_std([n], [s], [q], by_channel=by_channel)
