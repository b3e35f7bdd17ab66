"""Crash-safe file writes: write to a temporary file, fsync, then rename over the target."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _temporary(path: Path, data: bytes, durable: bool) -> str:
    """A new temporary file (mode 0600) beside ``path`` holding ``data``, fsynced if
    ``durable``; its name. A failed write removes it and raises."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.
    ``durable``: fsync the file and its directory, so the new file survives a power cut
    (without it, a process crash still leaves the old or the new file)."""
    path = Path(path)
    tmp = _temporary(path, data, durable)
    try:
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def create_private(path: str | Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 holding ``data``, all or nothing: written to a
    temporary file (0600), fsynced, linked into place, the directory fsynced. Never
    replaces a file (raises FileExistsError if it exists); a failed write (a full disk)
    raises and leaves no file, not a short one. For keys and secrets."""
    path = Path(path)
    tmp = _temporary(path, data, durable=True)
    try:
        os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_figure(fig: Any, path: str | Path) -> None:
    """Render a matplotlib figure to PNG and write it atomically; closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
