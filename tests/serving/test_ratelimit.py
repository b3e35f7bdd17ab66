"""The per-caller rate limiter: GCRA's arithmetic, one budget across forked processes,
and a full table that never leaves a caller with fewer requests than its limit."""

from __future__ import annotations

import multiprocessing

from fedfuse.serving.ratelimit import PROBES, RateLimiter, gcra


def test_gcra_lets_a_burst_of_the_limit_in_then_one_per_interval():
    interval, tolerance = 20.0, 40.0  # 3 per 60 s
    tat, answers = 0.0, []
    for _ in range(4):
        allowed, tat, wait = gcra(tat, 100.0, interval, tolerance)
        answers.append((allowed, wait))
    assert answers == [(True, 0.0)] * 3 + [(False, 20.0)]
    assert tat == 160.0  # refused requests do not move it
    assert gcra(tat, 119.0, interval, tolerance)[:1] == (False,)
    allowed, tat, _ = gcra(tat, 120.0, interval, tolerance)
    assert allowed and tat == 180.0
    assert gcra(tat, 120.0, interval, tolerance) == (False, 180.0, 20.0)


def test_limits_count_per_caller():
    limiter = RateLimiter("3/minute")
    assert [limiter.retry_after("key:a") for _ in range(3)] == [None] * 3
    assert limiter.retry_after("key:a") == 20
    assert limiter.retry_after("key:b") is None


def _spend(limiter: RateLimiter, caller: str, n: int, out) -> None:
    out.put([limiter.retry_after(caller) for _ in range(n)])


def test_forked_processes_share_one_budget():
    limiter = RateLimiter("5/minute")
    assert limiter.retry_after("key:a") is None
    fork = multiprocessing.get_context("fork")
    out = fork.Queue()
    children = [fork.Process(target=_spend, args=(limiter, "key:a", 2, out))
                for _ in range(2)]
    for child in children:
        child.start()
    spent = [out.get(timeout=30) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert spent == [[None, None], [None, None]]
    # 1 + 2 + 2 = 5 used in three processes: the sixth is refused here
    assert limiter.retry_after("key:a") is not None
    assert limiter.retry_after("key:b") is None


def test_a_full_table_evicts_without_taking_budget():
    limiter = RateLimiter("1/minute", slots=PROBES)
    callers = [f"ip:10.0.0.{i}" for i in range(PROBES)]
    assert [limiter.retry_after(c) for c in callers] == [None] * PROBES
    assert all(limiter.retry_after(c) is not None for c in callers)  # all spent
    newcomer = "ip:10.0.1.1"
    assert limiter.retry_after(newcomer) is None  # a new caller still gets in,
    assert limiter.retry_after(newcomer) is not None  # and then has spent its budget
    # it took the slot of the spent caller nearest to expiry, which so has a fresh
    # budget again: under a full table a caller may get more, never fewer
    assert limiter.retry_after(callers[0]) is None
