"""Flower's SuperNode with short waits: ``python -m fedfuse.deploy.supernode`` takes
``flower-supernode``'s arguments.

Flower 1.41's SuperNode sleeps 3 s whenever a pull from the SuperLink finds nothing,
and waits for its ClientApp's reply in 0.5 s steps (both hard-coded). A message that
arrives just after a pull waits up to 3 s at every site, every exchange: most of a
deployed round. This entry point runs the same SuperNode with those waits paced
instead (``fedfuse.compat.serve_supernode``): :data:`POLL` after a message, doubling
while none comes up to :data:`IDLE`.
"""

from __future__ import annotations

POLL = 0.02
"""Seconds the SuperNode waits after the first empty pull following a message, and
between checks for its ClientApp's reply."""
IDLE = 0.4
"""The longest wait between pulls while no message comes: at most this much latency is
added to a message, and an idle site asks the SuperLink 2.5 times a second (a fixed
20 ms would be 50 requests a second per site, which a SuperLink serving ten sites on
two cores spends most of its time answering)."""


def main() -> None:
    from fedfuse.compat import serve_supernode

    serve_supernode(POLL, IDLE)


if __name__ == "__main__":
    main()
