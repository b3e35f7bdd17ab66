"""Predict API benchmark: throughput and latency against an unbatched FastAPI baseline.

    python simulations/bench/serve.py [--concurrency 1 16 64] [--seconds 5]

Both servers run the same fused digits artifact (``cnn`` + ``mlp`` + ``logreg``), each in
its own uvicorn process with one torch thread, one after the other in this invocation:

- fedfuse: ``fedfuse serve`` as shipped, with an API key, schema validation, metrics and
  dynamic micro-batching (defaults: max batch 256, no added wait);
- baseline: ``serve_baseline.py``, a minimal FastAPI endpoint with one forward pass per
  request and no key.

The load is closed-loop: C connections (HTTP/1.1 keep-alive), each sending a one-instance
request as soon as its previous answer arrived, for ``--seconds`` after a 1 s warm-up;
then, where Debian's ``wrk`` is installed, ``wrk -t1 -c64`` for as long (after 2 s of
warm-up), the external figure the serving issue's target is set in; and, where
``h2load`` (Debian's nghttp2-client) is installed, the Open Inference Protocol's gRPC
ModelInfer on fedfuse's ``--grpc-port`` over 64 HTTP/2 connections, one call in flight
on each (the baseline has no gRPC). Then ``fedfuse serve --workers 2`` again under wrk
and h2load (two processes on one port, rate limits and metrics shared).
The client is a raw-socket asyncio loop in this process, far cheaper per request than an
HTTP library, but it shares the machine's cores with the server. Reported: requests per
second, p50 and p99 latency, and fedfuse / baseline ratios.

Writes ``simulations/bench/results/serve.json`` and the table between the
``bench:serve`` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import uvloop
from common import ROOT, machine, publish

from fedfuse.serving.auth import create_key
from tests.helpers import free_port, make_artifact


def request_bytes(port: int, path: str, body: bytes, key: str | None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def connection(port: int, request: bytes, until: float, warm: float,
                     latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (start := time.perf_counter()) < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = head[9:12]
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            if status != b"200":
                raise RuntimeError(f"HTTP {status.decode()} from port {port}")
            if start >= warm:
                latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def load(port: int, request: bytes, concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    warm = time.perf_counter() + 1.0
    until = warm + seconds
    await asyncio.gather(*(connection(port, request, until, warm, latencies)
                           for _ in range(concurrency)))
    ms = np.array(latencies) * 1000
    return {"requests_per_s": round(len(ms) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(ms)}


def start(cmd: list[str], port: int, env: dict[str, str]) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start: {cmd}")


def wrk_script(path: Path, body: bytes, key: str | None) -> Path:
    """A wrk Lua script that POSTs ``body`` (with the API key, if any)."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}",
             'wrk.headers["Content-Type"] = "application/json"']
    if key:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk_load(url: str, script: Path, connections: int, seconds: float) -> dict:
    """wrk's figures (``-t1``, ``connections`` keep-alive connections), after a 2 s warm-up
    run of the same load."""
    def run(duration: float) -> str:
        return subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s",
                               "--latency", "-s", str(script), url], capture_output=True,
                              text=True, check=True).stdout

    run(2)
    out = run(seconds)

    def ms(label: str) -> float:
        value = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert value is not None, out
        return float(value.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[value.group(2)]

    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert rate is not None, out
    return {"requests_per_s": round(float(rate.group(1)), 1), "p50_ms": ms("50%"),
            "p99_ms": ms("99%"), "non_2xx": int(errors.group(1)) if errors else 0}


def grpc_body(instance: np.ndarray) -> bytes:
    """One ModelInferRequest (one FP32 instance, raw contents) as a gRPC message frame:
    a zero flag byte, the length (4 bytes, big endian), the protobuf bytes."""
    from fedfuse.serving.oip_proto import messages

    request = messages["ModelInferRequest"](model_name="fedfuse")
    request.inputs.add(name="input", datatype="FP32", shape=list(instance.shape))
    request.raw_input_contents.append(instance.astype("<f4").tobytes())
    data = request.SerializeToString()
    return b"\0" + len(data).to_bytes(4, "big") + data


def h2load_grpc(port: int, key: str, body: Path, connections: int, seconds: float,
                work: Path) -> dict:
    """h2load's figures for unary ModelInfer calls over ``connections`` HTTP/2
    connections, one call in flight on each (as wrk's HTTP/1.1 connections), after a
    2 s warm-up; p50/p99 from its per-request log. A call gRPC refused would still be
    HTTP 200: the caller checks one call with a real client first."""
    log = work / "h2load.log"

    def run(duration: float) -> str:
        return subprocess.run(
            ["h2load", "-D", f"{duration:g}", "-c", str(connections), "-m", "1",
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", f"authorization: Bearer {key}", "-d", str(body), "--log-file", str(log),
             f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"],
            capture_output=True, text=True, check=True).stdout

    run(2)
    out = run(seconds)
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    assert rate is not None, out
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    latency_ms = np.array([float(r[2]) / 1000 for r in rows])  # start, status, microseconds
    statuses = {r[1] for r in rows}
    return {"requests_per_s": round(float(rate.group(1)), 1),
            "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
            "http_statuses": sorted(statuses)}


def measure(name: str, cmd: list[str], port: int, env: dict[str, str], path: str,
            key: str | None, body: bytes, levels: list[int], seconds: float,
            work: Path, grpc: tuple[int, bytes, str] | None = None) -> dict:
    proc = start(cmd, port, env)
    try:
        request = request_bytes(port, path, body, key)
        out = {str(c): uvloop.run(load(port, request, c, seconds)) for c in levels}
        if shutil.which("wrk"):
            out["wrk"] = wrk_load(f"http://127.0.0.1:{port}{path}",
                                  wrk_script(work / f"{name}.lua", body, key), 64, seconds)
        if grpc is not None and shutil.which("h2load"):
            from fedfuse.serving.client import PredictClient

            grpc_port, frame, grpc_key = grpc
            with PredictClient(f"grpc://127.0.0.1:{grpc_port}", api_key=grpc_key) as client:
                client.predict(np.zeros((1, 1, 8, 8)))  # the key works over gRPC
            (work / "infer.bin").write_bytes(frame)
            out["grpc"] = h2load_grpc(grpc_port, grpc_key, work / "infer.bin", 64, seconds,
                                      work)
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        print(f"{name} done", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_artifact(work / "model")
        _, key = create_key(work / "keys.json", "bench")
        instance = np.random.default_rng(0).uniform(0, 16, size=(1, 1, 8, 8)).round(2)
        body = json.dumps({"instances": instance.tolist()}).encode()
        port, grpc_port = free_port(), free_port()
        fedfuse = measure(
            "fedfuse", [sys.executable, "-m", "fedfuse", "serve", str(work / "model"),
                        "--port", str(port), "--api-keys", str(work / "keys.json"),
                        "--grpc-port", str(grpc_port)],
            port, {}, "/v1/predict", key, body, args.concurrency, args.seconds, work,
            grpc=(grpc_port, grpc_body(instance[0]), key))
        port, grpc_port = free_port(), free_port()
        workers = measure(
            "fedfuse-workers", [sys.executable, "-m", "fedfuse", "serve",
                                str(work / "model"), "--port", str(port), "--api-keys",
                                str(work / "keys.json"), "--grpc-port", str(grpc_port),
                                "--workers", "2"],
            port, {}, "/v1/predict", key, body, [], args.seconds, work,
            grpc=(grpc_port, grpc_body(instance[0]), key))
        port = free_port()
        baseline = measure(
            "baseline", [sys.executable, "-m", "uvicorn", "serve_baseline:app", "--port",
                         str(port), "--log-level", "warning",
                         "--app-dir", str(Path(__file__).parent)],
            port, {"ARTIFACT": str(work / "model"), "PYTHONPATH": str(ROOT)}, "/predict",
            None, body, args.concurrency, args.seconds, work)
    results = {"machine": machine(), "seconds": args.seconds, "instances_per_request": 1,
               "fedfuse": fedfuse, "fedfuse_2_workers": workers, "baseline": baseline,
               "throughput_ratio": {c: round(fedfuse[c]["requests_per_s"]
                                             / baseline[c]["requests_per_s"], 2)
                                    for c in fedfuse if c in baseline}}
    rows = ["| concurrent clients | fedfuse req/s | baseline req/s | fedfuse / baseline "
            "| fedfuse p50 / p99 | baseline p50 / p99 |", "|---|---|---|---|---|---|"]
    for c in (c for c in fedfuse if c in baseline):
        f, b = fedfuse[c], baseline[c]
        label = "64, wrk -t1" if c == "wrk" else c
        rows.append(f"| {label} | {f['requests_per_s']:.0f} | {b['requests_per_s']:.0f} | "
                    f"{results['throughput_ratio'][c]:.2f}x | {f['p50_ms']:.1f} / "
                    f"{f['p99_ms']:.1f} ms | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} ms |")
    if "wrk" in workers and "wrk" in baseline:
        w, b = workers["wrk"], baseline["wrk"]
        rows.append(f"| 64, wrk -t1, `--workers 2` | {w['requests_per_s']:.0f} | "
                    f"{b['requests_per_s']:.0f} | "
                    f"{w['requests_per_s'] / b['requests_per_s']:.2f}x | "
                    f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms | {b['p50_ms']:.1f} / "
                    f"{b['p99_ms']:.1f} ms |")
    for label, run in (("64, gRPC (h2load)", fedfuse),
                       ("64, gRPC (h2load), `--workers 2`", workers)):
        if "grpc" in run:
            g = run["grpc"]
            rows.append(f"| {label} | {g['requests_per_s']:.0f} | - | - | "
                        f"{g['p50_ms']:.1f} / {g['p99_ms']:.1f} ms | - |")
    rows.append(f"\nMeasured on {machine()}; {args.seconds:g} s per point after 1 s of "
                "warm-up, one instance (1x8x8) per request, closed loop over keep-alive "
                "connections; the load generator (this script's own raw-socket loop; wrk "
                "-t1 on the wrk rows, after a 2 s warm-up; h2load on the gRPC rows) runs on "
                "the same cores.")
    table = "\n".join(rows)
    publish("serve", results, ROOT / "docs" / "benchmarks.md", table)
    print(table)


if __name__ == "__main__":
    main()
