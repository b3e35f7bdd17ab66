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
IDLE = 0.1
"""The longest wait between pulls while no message comes: at most this much latency is
added to a message, and an idle site asks the SuperLink 10 times a second instead of
50 at a fixed 20 ms. (At 0.4 s a 3-site round took 3.1 s instead of 2.7 s, and 10 sites
on one machine were no faster.)"""


def main() -> None:
    from fedfuse.compat import serve_supernode

    serve_supernode(POLL, IDLE)


if __name__ == "__main__":
    main()
