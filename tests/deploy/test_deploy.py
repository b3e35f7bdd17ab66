"""Partner-site deployment: real ``fedfuse coordinator`` and ``fedfuse site`` processes
(Flower SuperLink / SuperNodes) on 127.0.0.1 with TLS and node authentication."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedfuse.data.sites import run_test_split
from fedfuse.deploy.certs import CertsDir, check_server_certificate, init_certs
from fedfuse.deploy.coordinator import Address
from fedfuse.deploy.site import probe_coordinator
from fedfuse.errors import FedfuseError
from tests.helpers import FEDFUSE, ROOT, free_port, run_cli, stop_process

SCENARIO = """
name = "three-sites"
seed = 5
rounds = {rounds}
round_timeout = {round_timeout}

[data]
source = "{test_data}"
val_fraction = 0.2

[partition]
method = "dirichlet"
alpha = 1.0

[[cohorts]]
arch = "logreg"
sites = ["a", "b", "c", "d"]

[privacy]
mode = "sample"
target_epsilon = 8.0

[deployment]
wait_for_sites = 90.0
"""


def write_scenario(tmp: Path, rounds: int = 2, round_timeout: float = 60.0) -> Path:
    path = tmp / "deploy.toml"
    path.write_text(SCENARIO.format(rounds=rounds, round_timeout=round_timeout,
                                    test_data=tmp / "data" / "test.npz"))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates for sites a, b, c, d and x (x is not in the scenario), and each
    site's data file written by ``fedfuse partition``."""
    tmp = tmp_path_factory.mktemp("deploy")
    scenario = write_scenario(tmp)
    assert run_cli("certs", "init", tmp / "certs", "--demo-sites", "a,b,c,d,x").returncode == 0
    res = run_cli("partition", scenario, "--out", tmp / "data", "--set", "data.source=digits")
    assert res.returncode == 0, res.stderr
    return tmp


class Proc:
    """A fedfuse command in the background, output to a file."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self.proc = subprocess.Popen([*FEDFUSE, *map(str, args)], cwd=ROOT,
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "COLUMNS": "200"})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def site(tmp: Path, name: str, port: int, *extra: str, certs: Path | None = None) -> Proc:
    return Proc(tmp / f"site-{name}-{time.monotonic_ns()}.log", "site",
                "--coordinator", f"127.0.0.1:{port}", "--certs", certs or tmp / "certs",
                "--name", name, "--data", tmp / "data" / f"{name if name != 'x' else 'a'}.npz",
                "--state", tmp / f"state-{name}", "--runtime-port", free_port(), *extra)


def ledger_steps(tmp: Path, name: str) -> int:
    path = tmp / f"state-{name}" / "privacy-ledger.json"
    if not path.exists():
        return 0
    return sum(int(s) for _, _, s in json.loads(path.read_text())["history"])


def recorded_rounds(out: Path) -> list[dict]:
    """The rounds in the run directory, finished or still being written."""
    for path in (out / "metrics.jsonl", out.parent / f".{out.name}.partial" / "metrics.jsonl"):
        if path.exists():
            return [json.loads(line) for line in path.read_text().splitlines()]
    return []


def drop_round(history: list[dict]) -> int | None:
    """The first round the other three sites trained without the fourth (it failed,
    dropped out of secure aggregation, or was offline and not sent the round). A round
    none of them answered in time (a cold first round on a loaded machine: seen at
    140 s against a 60 s round timeout) is not one."""
    for record in history:
        if record["cohorts"]["logreg"]["train_clients"] == 3:
            return int(record["round"])
    return None


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_four_sites_tls_auth_dp_secagg_with_a_site_killed_and_restarted(federation: Path):
    """Coordinator + sites a, b, c, d on 127.0.0.1 (TLS, node authentication, DP, secure
    aggregation). Meanwhile: site x (a key the scenario does not list) and a plaintext
    SuperNode are refused; site c is killed with SIGKILL once its first round is charged
    to its ledger (by then it has sent its keys, and perhaps its shares, for the next
    round's session: they ride on round 1's exchanges), and restarted from its state
    directory once a round has gone on without it. That round's secure sum is unmasked
    over the 3 survivors; the run completes, c's ledger kept every charge, and the
    artifact loads."""
    tmp = federation
    port = free_port()
    out = tmp / "run"
    # 60 s a round: on a slow machine a live site's first DP round must not time out while
    # the secure sum waits for the survivors
    coord = Proc(tmp / "coordinator.log", "coordinator", write_scenario(tmp, 12, 60.0),
                 "--certs", tmp / "certs", "--address", f"127.0.0.1:{port}", "--out", out,
                 "--state", tmp / "coordinator-state")
    sites = {n: site(tmp, n, port) for n in "abcd"}
    try:
        # c's first private round is on its disk once its ledger has steps
        wait_for(lambda: ledger_steps(tmp, "c") > 0 or coord.proc.poll() is not None, 240,
                 "site c's first round")
        steps_at_kill = ledger_steps(tmp, "c")
        assert steps_at_kill > 0, coord.output()
        os.kill(sites["c"].proc.pid, signal.SIGKILL)  # its SuperNode dies with it
        sites["c"].proc.wait()

        # refused while the run goes on: an unlisted key, and plaintext
        plain_log = tmp / "plain.log"
        plain = subprocess.Popen(
            [str(Path(sys.executable).parent / "flower-supernode"), "--insecure",
             "--superlink", f"127.0.0.1:{port}", "--max-retries", "2",
             "--port", str(free_port())], stdout=plain_log.open("wb"),
            stderr=subprocess.STDOUT, env={**os.environ, "FLWR_HOME": str(tmp / "plain"),
                                            "PATH": f"{Path(sys.executable).parent}:"
                                                    f"{os.environ['PATH']}"})
        intruder = site(tmp, "x", port, "--max-wait", "5")
        assert intruder.wait(120) == 2
        assert "refused site 'x'" in intruder.output()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        try:
            plain.wait(30)
        except subprocess.TimeoutExpired:
            plain.kill()
            plain.wait()
        plain_out = plain_log.read_text(errors="replace")
        assert "Connection attempt failed" in plain_out and "SuperNode ID" not in plain_out
        assert plain.returncode != 0

        # c answered its first round or not (a SIGKILL races its reply): either way a
        # round goes on without it before it is restarted from the same state directory
        wait_for(lambda: drop_round(recorded_rounds(out)) is not None
                 or coord.proc.poll() is not None, 240, "a round without site c")
        sites["c"] = site(tmp, "c", port)
        assert coord.wait(600) == 0, coord.output()
    finally:
        for p in [*sites.values(), coord]:
            p.stop()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 12 and summary["secure_aggregation"] is True
    assert summary["deployment"] is True and summary["partition"] is None
    assert summary["privacy"]["mode"] == "sample"
    assert summary["privacy"]["max_epsilon"] <= 8.0 * 1.0001
    history = recorded_rounds(out)
    dropped_in = drop_round(history)
    assert dropped_in is not None, history
    without_c = history[dropped_in - 1]["cohorts"]["logreg"]
    assert without_c.get("secagg_clients") == 3 and not without_c["secagg_failed"], (
        without_c, coord.output()[-4000:])
    # the restarted site kept its account: the steps of its first round (whether or not
    # its update arrived) plus those of every round it trained after the restart
    entries = {e["client_id"]: e for e in json.loads((out / "privacy.json").read_text())["clients"]}
    rejoined = sum(r["cohorts"]["logreg"]["train_clients"] == 4 for r in history
                   if r["round"] > dropped_in)
    assert rejoined >= 1, history
    assert entries["c"]["steps"] == ledger_steps(tmp, "c") == steps_at_kill * (1 + rejoined)
    from fedfuse import FusedPredictor

    predictor = FusedPredictor.load(out / "model")
    test = np.load(tmp / "data" / "test.npz")
    accuracy = float((predictor.predict(test["X"]) == test["y"].astype(str)).mean())
    assert len(run_test_split(out)) == len(test["y"])  # what `fuse` and `query --run` use
    assert accuracy == pytest.approx(summary["fused"]["test_accuracy"], abs=1e-9)
    assert accuracy > 0.6


def test_site_refuses_a_coordinator_signed_by_another_ca(tmp_path: Path):
    other = tmp_path / "other"
    init_certs(other, ["a"], ["localhost", "127.0.0.1"])
    mine = tmp_path / "mine"
    init_certs(mine, ["a"], ["localhost", "127.0.0.1"])
    with tls_server(CertsDir(other)) as port:
        with pytest.raises(FedfuseError, match="not signed by the CA"):
            probe_coordinator(Address("127.0.0.1", port), CertsDir(mine).ca_cert, 5)


def test_site_refuses_a_certificate_for_another_host(tmp_path: Path):
    init_certs(tmp_path, ["a"], ["coordinator.example"])
    with tls_server(CertsDir(tmp_path)) as port:
        with pytest.raises(FedfuseError, match="does not list '127.0.0.1'"):
            probe_coordinator(Address("127.0.0.1", port), CertsDir(tmp_path).ca_cert, 5)


def test_site_refuses_an_expired_coordinator_certificate(tmp_path: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedfuse.deploy.certs import load_ca

    init_certs(tmp_path, ["a"], ["localhost", "127.0.0.1"])
    d = CertsDir(tmp_path)
    ca = load_ca(d)
    key = serialization.load_pem_private_key(d.server_key.read_bytes(), password=None)
    old = x509.load_pem_x509_certificate(d.server_cert.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    expired = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=30))
               .not_valid_after(now - dt.timedelta(days=1))
               .add_extension(old.extensions.get_extension_for_class(
                   x509.SubjectAlternativeName).value, critical=False)
               .sign(ca.key, hashes.SHA256()))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    d.server_cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(FedfuseError, match="not now"):
        check_server_certificate(d)
    with tls_server(d) as port:
        with pytest.raises(FedfuseError, match="has expired"):
            probe_coordinator(Address("127.0.0.1", port), d.ca_cert, 5)


def test_site_gives_up_on_an_unreachable_coordinator_with_a_message(federation: Path):
    port = free_port()  # nothing listens there
    started = time.monotonic()
    res = run_cli("site", "--coordinator", f"127.0.0.1:{port}", "--certs",
                  federation / "certs", "--name", "a", "--data", federation / "data" / "a.npz",
                  "--state", federation / "state-unreachable", "--connect-timeout", "3",
                  timeout=60)
    assert res.returncode == 2
    assert f"coordinator 127.0.0.1:{port} is unreachable after" in res.stderr
    assert time.monotonic() - started < 45


def test_site_checks_its_key_before_connecting(federation: Path, tmp_path: Path):
    res = run_cli("site", "--coordinator", "127.0.0.1:1", "--certs", federation / "certs",
                  "--name", "nobody", "--data", federation / "data" / "a.npz",
                  "--state", tmp_path / "s")
    assert res.returncode == 2 and "site nobody has no key" in res.stderr
    assert "fedfuse site init --name nobody" in res.stderr


def test_coordinator_refuses_an_expired_certificate(tmp_path: Path):
    init_certs(tmp_path, ["a"], [])
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=900)
    with pytest.raises(FedfuseError, match="not now"):
        check_server_certificate(CertsDir(tmp_path), now=later)
    check_server_certificate(CertsDir(tmp_path))


def test_coordinator_refuses_a_scenario_without_sites(federation: Path, scenario):
    res = run_cli("coordinator", scenario(), "--certs", federation / "certs",
                  "--address", f"127.0.0.1:{free_port()}")
    assert res.returncode == 2 and "cohorts[0].sites" in res.stderr


def test_coordinator_refuses_a_site_without_a_key(federation: Path, tmp_path: Path):
    text = write_scenario(federation).read_text().replace('"a", "b", "c"', '"a", "b", "zed"')
    path = tmp_path / "s.toml"
    path.write_text(text)
    res = run_cli("coordinator", path, "--certs", federation / "certs",
                  "--address", f"127.0.0.1:{free_port()}")
    assert res.returncode == 2 and "site 'zed' has no public key" in res.stderr


def test_certs_init_never_replaces_keys(tmp_path: Path):
    first = run_cli("certs", "init", tmp_path / "c", "--demo-sites", "a,b")
    assert first.returncode == 0
    key = (tmp_path / "c" / "sites" / "a" / "auth.key").read_bytes()
    assert oct((tmp_path / "c" / "sites" / "a" / "auth.key").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "c" / "ca.key").stat().st_mode & 0o777) == "0o600"
    again = run_cli("certs", "init", tmp_path / "c", "--demo-sites", "a,b,c")
    assert again.returncode == 0
    assert (tmp_path / "c" / "sites" / "a" / "auth.key").read_bytes() == key
    assert "sites/c/auth.key" in again.stderr and "sites/a/" not in again.stderr
    other_hosts = run_cli("certs", "init", tmp_path / "c", "--demo-sites", "a", "--host", "new.example")
    assert other_hosts.returncode == 2 and "delete" in other_hosts.stderr
    bad = run_cli("certs", "init", tmp_path / "c", "--demo-sites", "../evil")
    assert bad.returncode == 2 and "not valid" in bad.stderr


def test_a_site_makes_its_own_keys_and_the_coordinator_registers_only_the_public_one(
        tmp_path: Path):
    certs, state = tmp_path / "certs", tmp_path / "state-a"
    assert run_cli("certs", "init", certs).returncode == 0
    assert not (certs / "sites").exists()  # no site key is made at the coordinator
    made = run_cli("site", "init", "--name", "a", "--state", state)
    assert made.returncode == 0 and "made its key pair" in made.stderr, made.stderr
    assert "secure-aggregation identity" in made.stderr  # the hex key peers may pin
    assert oct((state / "auth.key").stat().st_mode & 0o777) == "0o600"
    assert (state / "site-secret").stat().st_size == 32
    key = (state / "auth.key").read_bytes()
    kept = run_cli("site", "init", "--name", "a", "--state", state)
    assert "kept its key pair" in kept.stderr and (state / "auth.key").read_bytes() == key
    added = run_cli("certs", "add-site", certs, "--name", "a", "--pub", state / "auth.pub")
    assert added.returncode == 0, added.stderr
    assert (certs / "sites" / "a" / "auth.pub").read_bytes() == (state / "auth.pub").read_bytes()
    assert not (certs / "sites" / "a" / "auth.key").exists()
    again = run_cli("certs", "add-site", certs, "--name", "a", "--pub", state / "auth.pub")
    assert again.returncode == 0  # the same key again: nothing changes
    other = tmp_path / "state-b"
    run_cli("site", "init", "--name", "b", "--state", other)
    clash = run_cli("certs", "add-site", certs, "--name", "a", "--pub", other / "auth.pub")
    assert clash.returncode == 2 and "registered with another key" in clash.stderr
    (tmp_path / "junk.pub").write_text("ssh-ed25519 AAAA not a key\n")
    junk = run_cli("certs", "add-site", certs, "--name", "c", "--pub", tmp_path / "junk.pub")
    assert junk.returncode == 2 and "not an OpenSSH public key" in junk.stderr
    missing = run_cli("site", "--certs", certs, "--name", "c", "--coordinator", "127.0.0.1:1",
                      "--data", tmp_path / "none.npz", "--state", tmp_path / "state-c")
    assert missing.returncode == 2 and "fedfuse site init --name c" in missing.stderr


class tls_server:
    """A TLS server on 127.0.0.1 presenting the coordinator certificate of ``certs``;
    completes handshakes and closes."""

    def __init__(self, certs: CertsDir) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certs.server_cert, certs.server_key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()

    def __enter__(self) -> int:
        self.sock.settimeout(0.2)

        def serve() -> None:
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    continue
                try:
                    with self.context.wrap_socket(conn, server_side=True):
                        pass
                except (ssl.SSLError, OSError):
                    pass

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        return self.sock.getsockname()[1]

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def test_superlink_guard_serves_only_the_fleet_api_beyond_loopback():
    """The coordinator's port answers Control and Runtime requests only from loopback."""
    import asyncio

    from fedfuse.deploy.superlink import FleetOnlyBeyondLoopback

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status(path: str, client: tuple[str, int] | None) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "path": path, "client": client}
        asyncio.run(FleetOnlyBeyondLoopback(app)(scope, receive, send))
        return sent[0]["status"]

    remote, local = ("203.0.113.9", 5000), ("127.0.0.1", 5000)
    assert status("/v1/fleet/pull-messages", remote) == 200
    assert status("/v1/control/start-run", remote) == 403
    assert status("/v1/control/register-node", ("::ffff:203.0.113.9", 1)) == 403
    assert status("/v1/runtime/pull-messages", remote) == 403
    assert status("/v1/fleetx", remote) == 403
    assert status("/v1/control/start-run", None) == 403
    assert status("/v1/control/start-run", local) == 200
    assert status("/v1/runtime/pull-messages", ("::1", 1)) == 200
    assert status("/v1/control/list-runs", ("::ffff:127.0.0.1", 1)) == 200


def test_coordinator_refuses_an_out_with_an_interrupted_run(federation: Path, tmp_path: Path):
    (tmp_path / ".run.partial").mkdir()
    res = run_cli("coordinator", write_scenario(federation), "--certs", federation / "certs",
                  "--address", f"127.0.0.1:{free_port()}", "--out", tmp_path / "run")
    assert res.returncode == 2 and "holds an interrupted run" in res.stderr


@pytest.mark.slow
def test_sites_with_the_default_policy_refuse_a_run_without_dp(federation: Path,
                                                               tmp_path: Path):
    """A coordinator whose scenario turns DP off (privacy.mode = "off"): every site, on
    the default policy, refuses every train message, so no site trains and no weights
    leave; the coordinator logs each refusal with its rule, and the run still ends."""
    tmp = federation
    port = free_port()
    scenario = write_scenario(tmp_path, 2, 20.0)
    scenario.write_text(scenario.read_text().replace('mode = "sample"', 'mode = "off"')
                        .replace("target_epsilon = 8.0\n", "")
                        .replace(str(tmp_path / "data"), str(tmp / "data")))
    coord = Proc(tmp_path / "coordinator.log", "coordinator", scenario,
                 "--certs", tmp / "certs", "--address", f"127.0.0.1:{port}",
                 "--out", tmp_path / "run", "--state", tmp_path / "coordinator-state")
    sites = {n: Proc(tmp_path / f"site-{n}.log", "site", "--coordinator", f"127.0.0.1:{port}",
                     "--certs", tmp / "certs", "--name", n, "--data", tmp / "data" / f"{n}.npz",
                     "--state", tmp_path / f"state-{n}", "--runtime-port", free_port())
             for n in "abcd"}
    try:
        assert coord.wait(600) == 0, coord.output()
    finally:
        for p in [*sites.values(), coord]:
            p.stop()
    log = coord.output()
    for n in "abcd":
        assert f"site {n} refused by the site's policy (require_dp)" in log, log[-3000:]
        assert "policy (default): record-level DP required, lifetime ε ≤ 8" in \
            sites[n].output()
        assert not (tmp_path / f"state-{n}" / "privacy-ledger.json").exists()
    for record in recorded_rounds(tmp_path / "run"):
        entry = record["cohorts"]["logreg"]
        assert entry["train_clients"] == 0 and entry["secagg_failed"], entry
