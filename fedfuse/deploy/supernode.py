"""Flower's SuperNode with short waits: ``python -m fedfuse.deploy.supernode`` takes
``flower-supernode``'s arguments.

Flower 1.41's SuperNode sleeps 3 s whenever a pull from the SuperLink finds nothing,
and waits for its ClientApp's reply in 0.5 s steps (both hard-coded). A message that
arrives just after a pull waits up to 3 s at every site, every exchange: most of a
deployed round. This entry point runs the same SuperNode with those waits capped at
:data:`POLL` (``fedfuse.compat.serve_supernode``).
"""

from __future__ import annotations

POLL = 0.05
"""Seconds the SuperNode waits after an empty pull, and between checks for a reply:
the added latency per message, against one small request per site to the SuperLink
per interval while idle."""


def main() -> None:
    from fedfuse.compat import serve_supernode

    serve_supernode(POLL)


if __name__ == "__main__":
    main()
