"""A site's secrets (``site-secret``, ``superexec-secret``): 32 random bytes written all or
nothing; a short or empty file is refused, never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedfuse.deploy.apps import SECRET_FILE, site_secret
from fedfuse.errors import FedfuseError

ROOT = Path(__file__).resolve().parents[2]


def test_a_new_secret_is_32_random_bytes_kept_0600(tmp_path):
    state = tmp_path / "state"
    secret = site_secret(state)
    assert len(secret) == 32 and site_secret(state) == secret  # made once, then kept
    assert (state / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert site_secret(tmp_path / "other") != secret
    assert [p.name for p in state.iterdir()] == [SECRET_FILE]  # no temporary file left


@pytest.mark.parametrize("size", [0, 31, 33])
def test_a_secret_of_the_wrong_length_is_refused_and_left_as_it_is(tmp_path, size):
    path = tmp_path / SECRET_FILE
    path.write_bytes(b"\x01" * size)
    with pytest.raises(FedfuseError, match=f"holds {size} bytes, not the 32"):
        site_secret(tmp_path)
    assert path.read_bytes() == b"\x01" * size


FULL_DISK = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from fedfuse.deploy.apps import site_secret
    from fedfuse.errors import FedfuseError
    state = Path(sys.argv[1]) / "state"
    state.mkdir()
    try:
        site_secret(state)
        error = None
    except FedfuseError as exc:
        error = str(exc)
    print(json.dumps({"error": error, "left": sorted(os.listdir(state))}))
""")


def test_a_write_failing_on_a_full_disk_is_refused_and_leaves_no_file(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(FULL_DISK)
    # a 4 KiB tmpfs, filled up, in a private mount namespace (no root needed outside it)
    script = (f"mount -t tmpfs -o size=4k tmpfs {disk} && "
              f"(dd if=/dev/zero of={disk}/fill bs=1k count=16 2>/dev/null; true) && "
              f"exec {sys.executable} {probe} {disk}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] is not None and "could not write the secret" in out["error"]
    assert "No space left on device" in out["error"]
    assert out["left"] == []  # neither a short secret nor a temporary file
