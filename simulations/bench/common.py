"""Helpers shared by the benchmark scripts: running the CLI, and publishing results."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fedfuse.atomic import atomic_write_json, atomic_write_text  # noqa: E402


def machine(device: str = "cpu") -> str:
    """The host and the device the figures come from, e.g. ``x86_64 Linux, 2 cores, cpu``."""
    import os

    from fedfuse.models.device import device_label, resolve_device

    label = device_label(resolve_device(device, "--device"))
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, {label}"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N or auto: where fedfuse and its baseline run")


def simulate(scenario: Path, out: Path, overrides: list[str]) -> Path:
    """``fedfuse simulate`` in a subprocess (a fresh engine per run); returns ``out``."""
    cmd = [sys.executable, "-m", "fedfuse", "simulate", str(scenario), "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"simulation failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def publish(name: str, results: dict, docs: Path, table: str) -> None:
    """Write ``results/<name>.json`` and put ``table`` between the ``bench:<name>``
    markers of ``docs``."""
    out = ROOT / "simulations" / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    start_marker, end_marker = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = docs.read_text(encoding="utf-8")
    start, end = text.index(start_marker), text.index(end_marker)
    atomic_write_text(docs, text[:start + len(start_marker)] + "\n" + table + "\n" + text[end:])
