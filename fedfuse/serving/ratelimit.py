"""Per-caller rate limits, one budget per caller across every worker process of a server.

The rule is GCRA (the generic cell rate algorithm: a token bucket kept as one number per
caller). A limit of L requests per period P has the emission interval T = P / L and the
burst tolerance τ = P − T. Each caller has a theoretical arrival time TAT; a request at
time t is let in iff ``max(TAT, t) − τ ≤ t``, and then ``TAT ← max(TAT, t) + T``; a
refused one may retry after ``max(TAT, t) − τ − t``. A caller so gets L requests at once,
then one every T: the same long-run rate as L per moving window of P, with bursts of up
to L.

The state is a table in memory shared with the processes forked after the limiter is
made (an anonymous shared mapping and one lock), so ``fedfuse serve --workers N`` keeps
one budget per caller whichever worker answers. A caller's slot is found by its 64-bit
string hash (SipHash under the interpreter's random key, which forked workers share, so
a caller cannot aim collisions unless PYTHONHASHSEED fixes the key) and linear probing
over :data:`PROBES` slots. A slot whose TAT has passed holds no budget and is reused; a
full probe run evicts the slot nearest to expiry (its caller gets a fresh budget: never
fewer requests than its limit).
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import time

from limits import parse

SLOTS = 1 << 16
"""Callers tracked at once (1 MiB of shared memory)."""
PROBES = 16


def gcra(tat: float, now: float, interval: float, tolerance: float
         ) -> tuple[bool, float, float]:
    """(let in, the caller's new TAT, seconds to wait if refused) for a request at
    ``now`` (formulas in the module docstring)."""
    start = max(tat, now)
    if start - tolerance > now:
        return False, tat, start - tolerance - now
    return True, start + interval, 0.0


class RateLimiter:
    """At most ``rate`` (``"100/second"``) per caller, shared by forked workers; the
    table holds ``slots`` callers (at least :data:`PROBES`)."""

    def __init__(self, rate: str, slots: int = SLOTS) -> None:
        self.limit = parse(rate)  # ServeConfig has checked it
        period = float(self.limit.get_expiry())
        self.interval = period / self.limit.amount
        self.tolerance = period - self.interval
        self.slots = max(slots, PROBES)
        memory = mmap.mmap(-1, self.slots * 16)  # anonymous and MAP_SHARED
        self._hashes = memoryview(memory)[:self.slots * 8].cast("Q")
        self._tats = memoryview(memory)[self.slots * 8:].cast("d")
        self._lock = multiprocessing.get_context("fork").Lock()

    def retry_after(self, caller: str) -> int | None:
        """None when ``caller`` may go ahead (and counts the request), else the whole
        seconds until it may."""
        h = (hash(caller) & 0xFFFF_FFFF_FFFF_FFFF) | 1  # 0 marks an empty slot
        start = h % self.slots
        now = time.monotonic()
        hashes, tats = self._hashes, self._tats
        with self._lock:
            slot, tat = start, math.inf
            for i in range(start, start + PROBES):
                i %= self.slots
                if hashes[i] == h:
                    slot, tat = i, tats[i]
                    break
                if tats[i] < tat:  # an empty slot (0), else the one nearest to expiry
                    slot, tat = i, tats[i]
            else:
                hashes[slot], tat = h, now
            allowed, tats[slot], wait = gcra(tat, now, self.interval, self.tolerance)
        return None if allowed else max(1, math.ceil(wait))
