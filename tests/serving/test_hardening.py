"""The security review's serving findings, each attacked against the real server (or the
real middleware and batcher) and refused: float32 overflow, a bad in-place update, a
deleted keys file, an unbounded queue, and IPv6 clients rotating addresses in their /64."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.serving.auth import create_key
from fedfuse.serving.batcher import BatcherFull, MicroBatcher
from fedfuse.serving.guard import GuardMiddleware
from fedfuse.serving.ratelimit import RateLimiter
from tests.helpers import Server, make_artifact


def strict_json(answer: httpx.Response) -> dict:
    """The body parsed as standard JSON: NaN or Infinity in it fail here."""
    def refuse(token: str) -> None:
        raise AssertionError(f"the response holds {token}: {answer.text[:200]}")

    return json.loads(answer.text, parse_constant=refuse)


def until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_hardened_server_refuses_each_attack(tmp_path: Path):
    x = load_dataset(DataConfig()).X[:256]
    registry = tmp_path / "registry"
    make_artifact(registry / "v1", semver="1.0.0")
    keys = tmp_path / "keys.json"
    _, key = create_key(keys, "a")
    auth = {"Authorization": f"Bearer {key}"}
    with Server(registry, "--api-keys", keys, "--reload-interval", "0.2",
                "--max-queue", "1") as server, httpx.Client(base_url=server.url) as http:
        def post(instances, headers=auth) -> httpx.Response:
            return http.post("/v1/predict", headers=headers,
                             content=json.dumps({"instances": instances}))

        # 1e39 is a finite JSON number that float32 cannot hold: 422 naming it, no NaN
        rows = x[:2].tolist()
        rows[1][0][3][5] = 1e39
        answer = post(rows)
        assert answer.status_code == 422, answer.text
        error = strict_json(answer)
        assert error["field"] == "instances[1][0][3][5]" and "float32" in error["message"]
        assert post([[[[-3.5e38] * 8] * 8]]).status_code == 422
        ok = post(x[:2].tolist())
        assert ok.status_code == 200
        version = strict_json(ok)["model_version"]

        # flooded: at most one request waits; the others get 503 + Retry-After at once
        def flood(_: int) -> httpx.Response:
            return post(x.tolist())

        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(flood, range(192)))
        statuses = [a.status_code for a in answers]
        busy = [a for a in answers if a.status_code == 503]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
        assert busy, "no request was refused with max_queue = 1"
        assert all(a.headers["retry-after"] == "1" and strict_json(a)["error"] == "overloaded"
                   for a in busy)

        # v1 rewritten in place with a tampered member: refused, v1 keeps serving
        member = registry / "v1" / "members" / "mlp.safetensors"
        data = bytearray(member.read_bytes())
        data[-1] ^= 1
        member.write_bytes(bytes(data))
        manifest = registry / "v1" / "manifest.json"
        os.utime(manifest, (time.time() + 5, time.time() + 5))
        assert until(lambda: "still serving version" in server.output()), server.output()
        time.sleep(0.5)  # several rescans later
        again = post(x[:2].tolist())
        assert again.status_code == 200 and strict_json(again)["model_version"] == version
        assert http.get("/readyz").status_code == 200

        # the keys file deleted: every key is refused until it is back
        saved = keys.read_bytes()
        keys.unlink()
        assert until(lambda: post(x[:1].tolist()).status_code == 401), server.output()
        assert post(x[:1].tolist(), headers={}).status_code == 401
        keys.write_bytes(saved)
        assert until(lambda: post(x[:1].tolist()).status_code == 200), server.output()


def test_the_batcher_refuses_past_its_queue_bound():
    release = threading.Event()

    def slow(x: np.ndarray) -> np.ndarray:
        release.wait(10)
        return x[:, :1]

    async def scenario() -> tuple[list, int]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, max_batch_size=1, max_wait=0.0, executor=pool,
                                   max_queue=2)
            batcher.start()
            first = asyncio.create_task(batcher.submit(np.ones((1, 3))))
            await asyncio.sleep(0.05)  # in the model now, the queue empty
            waiting = [asyncio.create_task(batcher.submit(np.ones((1, 3)))) for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(BatcherFull, match="2 requests are already waiting"):
                await batcher.submit(np.ones((1, 3)))
            release.set()
            done = await asyncio.gather(first, *waiting)
            await batcher.stop()
            return done, len(done)

    done, n = asyncio.run(scenario())
    assert n == 3 and all(d.shape == (1, 1) for d in done)


def test_ipv6_clients_share_their_64s_rate_limit():
    """Without keys the limit is per client: an IPv6 client rotating through addresses of
    its /64 still has one budget, another /64 has its own."""
    async def inner(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = GuardMiddleware(inner, max_body_bytes=1024, keys=lambda: None,
                            limiter=RateLimiter("3/minute"))

    async def status(host: str) -> int:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/predict", "headers": [], "client": (host, 1)}
        await guard(scope, receive, send)
        return sent[0]["status"]

    async def scenario() -> list[int]:
        same = [f"2001:db8:1:2::{i:x}" for i in range(1, 5)]
        return [await status(h) for h in [*same, "2001:db8:1:3::1", "192.0.2.1",
                                          "::ffff:192.0.2.1"]]

    assert asyncio.run(scenario()) == [200, 200, 200, 429, 200, 200, 200]
