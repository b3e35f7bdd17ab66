"""Who shares with whom in a session: every member's neighbourhood (SecAgg+).

Classic SecAgg (Bonawitz et al. 2017) makes each of n members share its two secrets
with, and agree a pairwise mask with, every other member: 2 (n - 1) key agreements and
n Shamir shares per member per session. SecAgg+ (Bell et al. 2020, also Flower's
``SecAggPlusWorkflow``) uses a sparse graph instead: the members are put on a ring in a
random order and each one's neighbours are the k / 2 members on either side of it (the
Harary graph H(k, n) under a random permutation). A member Shamir-shares b and s among
its neighbourhood N(u) (itself and its k neighbours, threshold
t_u = max(2, ceil(threshold * |N(u)|))) and masks pairwise with its neighbours only, so
its work is O(k) instead of O(n). The masks still cancel in the sum: every edge {u, v}
is added by one end and subtracted by the other.

What the sparse graph gives up (docs/secure-aggregation.md#neighbourhoods): against a
coordinator that follows the protocol, a member's update stays hidden while its honest,
surviving neighbours connect it to the rest; the random order makes a neighbourhood
made mostly of colluding or dropped members unlikely, not impossible. The complete graph
(k = 0, the default) has no such event.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def neighbourhoods(members: Sequence[str], k: int, rng: random.Random
                   ) -> dict[str, list[str]]:
    """N(u) for every member u: u and the k / 2 members on either side of it on a ring in
    an order drawn by ``rng``, listed in ``members``' order (so any two members list
    each other in the same relative order). k = 0, or k >= n - 1: every member's
    neighbourhood is all members (the complete graph)."""
    n = len(members)
    if k == 0 or k >= n - 1:
        return {u: list(members) for u in members}
    ring = list(members)
    rng.shuffle(ring)
    position = {u: i for i, u in enumerate(ring)}
    half = k // 2
    rank = {u: i for i, u in enumerate(members)}
    return {u: sorted((ring[(position[u] + d) % n] for d in range(-half, half + 1)),
                      key=rank.__getitem__) for u in members}
