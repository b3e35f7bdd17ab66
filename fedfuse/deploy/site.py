"""``fedfuse site``: a partner site's Flower SuperNode, with its data, key and state.

The SuperNode runs with ``--isolation process`` and a SuperExec secret made at the
site: this process is its executor and runs every message in process, with the site's
data and models loaded once (``fedfuse.deploy.warm``), and the SuperNode's own waits
are paced (``fedfuse.deploy.supernode``).

Before the SuperNode starts, the site checks what it can check alone and explains what
goes wrong: its key and data files, then a TLS handshake with the coordinator against
the CA (retried while the coordinator is unreachable, refused at once for a wrong CA,
an expired certificate or a host name the certificate does not list). The SuperNode's
own exit is translated too (an unregistered key, a coordinator gone for good).
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedfuse.compat import RuntimeTasks
from fedfuse.config import DataConfig
from fedfuse.data.datasets import load_dataset
from fedfuse.deploy.apps import secret_file, site_secret
from fedfuse.deploy.certs import CertsDir, check_site_name
from fedfuse.deploy.coordinator import Address
from fedfuse.deploy.process import FlowerProcess
from fedfuse.errors import FedfuseError
from fedfuse.models.device import resolve_device
from fedfuse.site.policy import load_policy

SOCKET_TIMEOUT = 5.0
EXECUTOR_SECRET = "superexec-secret"
"""The secret the SuperNode's Runtime API asks of its executor (this process), made at
the site; without it another local process could claim the site's tasks."""


@dataclass(frozen=True)
class SiteOptions:
    coordinator: str
    certs: Path
    name: str
    data: Path
    state: Path
    runtime_port: int = 9094
    """Port of the SuperNode's local Runtime API (loopback); one per site on a machine."""
    connect_timeout: float = 120.0
    """Seconds to keep retrying an unreachable coordinator at start-up."""
    max_wait: float = 600.0
    """Seconds the SuperNode keeps reconnecting after losing the coordinator."""
    device: str = "cpu"
    """Where this site trains (``fedfuse.device``); a GPU is the site's own."""
    policy: Path | None = None
    """The site's privacy policy file (``fedfuse.site.policy``; None: the default)."""
    allow_arch: tuple[str, ...] = ()
    """User model code the site imports besides its policy's ``allow_arch``."""


AUTH_KEY, AUTH_PUB = "auth.key", "auth.pub"
"""The site's node-authentication key pair in its state directory, made by ``fedfuse
site init``: the private key never leaves the site, the public one goes to the
coordinator (``fedfuse certs add-site``)."""


def site_key(opts: SiteOptions) -> Path:
    """The site's private key: its own (``STATE/auth.key``), else one the coordinator
    made for the one-machine walk-through (``CERTS/sites/NAME/auth.key``)."""
    own = opts.state / AUTH_KEY
    return own if own.is_file() else CertsDir(opts.certs).site_key(opts.name)


def identity(state: Path) -> str:
    """The site's secure-aggregation identity (hex Ed25519 public key, derived from its
    secret): what other sites pin in their policy's ``peers``."""
    from fedfuse.secagg import crypto

    return crypto.identity_public(crypto.identity_key(site_secret(state))).hex()


def init_site(name: str, state: Path) -> tuple[Path, bool]:
    """Make the site's node-authentication key pair (EC P-384, OpenSSH; private key
    0600) and its secret in ``state``, here at the site; returns the public key's path
    and whether it was made now (a pair already there is kept)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedfuse.deploy.certs import write_auth_key

    check_site_name(name)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, pub = state / AUTH_KEY, state / AUTH_PUB
    site_secret(state)
    if key.exists():
        return pub, False
    write_auth_key(ec.generate_private_key(ec.SECP384R1()), key, pub)
    return pub, True


def check_site_files(opts: SiteOptions) -> tuple[Path, Path]:
    """The CA certificate and the site's key, checked; the data file loads; the device
    exists here."""
    check_site_name(opts.name)
    resolve_device(opts.device, "--device")
    certs = CertsDir(opts.certs)
    ca, key = certs.ca_cert, site_key(opts)
    if not ca.is_file():
        raise FedfuseError(f"{ca} is missing: copy ca.pem from the coordinator's certs "
                           "directory")
    if not key.is_file():
        raise FedfuseError(f"site {opts.name} has no key: run `fedfuse site init --name "
                           f"{opts.name} --state {opts.state}` and give the coordinator "
                           f"{opts.state / AUTH_PUB} to register")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        private = load_ssh_private_key(key.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise FedfuseError(f"{key}: not an OpenSSH private key ({exc})") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise FedfuseError(f"{key}: node authentication needs an EC key")
    if key.stat().st_mode & 0o077:
        raise FedfuseError(f"{key} is readable by other users; chmod 600 {key}")
    load_dataset(DataConfig(source=str(opts.data)))
    return ca, key


def probe_coordinator(address: Address, ca: Path, timeout: float,
                      say: Callable[[str], None] = print) -> None:
    """Complete one TLS handshake with the coordinator, verifying its certificate against
    ``ca``; connection failures are retried with backoff for ``timeout`` seconds."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    delay, attempts = 1.0, 0
    while True:
        attempts += 1
        try:
            with socket.create_connection((address.host, address.port),
                                          timeout=SOCKET_TIMEOUT) as sock:
                with context.wrap_socket(sock, server_hostname=address.host):
                    return
        except ssl.SSLCertVerificationError as exc:
            raise FedfuseError(explain_verify_error(exc, address, ca)) from None
        except ssl.SSLError as exc:
            raise FedfuseError(f"TLS handshake with {address.host}:{address.port} failed "
                               f"({exc.reason}): is a fedfuse coordinator with TLS listening "
                               "there?") from None
        except OSError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FedfuseError(f"coordinator {address.host}:{address.port} is unreachable "
                                   f"after {attempts} attempts over {timeout:.0f} s "
                                   f"({exc.strerror or exc})") from None
            say(f"coordinator {address.host}:{address.port} not reachable "
                f"({exc.strerror or exc}); retrying in {min(delay, left):.0f} s")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def explain_verify_error(exc: ssl.SSLCertVerificationError, address: Address, ca: Path) -> str:
    reason = exc.verify_message or str(exc)
    where = f"{address.host}:{address.port}"
    if "expired" in reason:
        return (f"the coordinator's certificate at {where} has expired; the coordinator must "
                "issue a new one (fedfuse certs init)")
    if "not yet valid" in reason:
        return f"the coordinator's certificate at {where} is not valid yet (check the clocks)"
    if "Hostname mismatch" in reason or "IP address mismatch" in reason:
        return (f"the coordinator's certificate does not list {address.host!r}; connect by a "
                f"name it lists, or reissue it with --host {address.host}")
    if any(s in reason for s in ("issuer", "self-signed", "self signed", "signature failure")):
        return (f"the coordinator's certificate at {where} is not signed by the CA in {ca} "
                "(wrong ca.pem, or not the fedfuse coordinator)")
    return f"the coordinator's certificate at {where} was rejected: {reason}"


def executor_secret(state: Path) -> Path:
    """The file holding the SuperExec secret (32 random bytes, 0600), made once."""
    return secret_file(state, EXECUTOR_SECRET)


def supernode_argv(opts: SiteOptions, ca: Path, key: Path, secret: Path) -> list[str]:
    node_config = " ".join(f"{k}={json.dumps(v)}" for k, v in {
        "name": opts.name, "data": str(opts.data.resolve()),
        "state-dir": str(opts.state.resolve()), "device": opts.device,
        "policy": str(opts.policy.resolve()) if opts.policy else "",
        "allow-arch": ",".join(opts.allow_arch)}.items())
    return [sys.executable, "-m", "fedfuse.deploy.supernode", "--root-certificates", str(ca),
            "--superlink", opts.coordinator, "--auth-supernode-private-key", str(key),
            "--node-config", node_config, "--port", str(opts.runtime_port),
            "--max-wait-time", str(opts.max_wait), "--isolation", "process",
            "--superexec-auth-secret-file", str(secret)]


NOT_ACTIVATED = "Failed to activate SuperNode"
ACTIVATION_PATIENCE = 75.0
"""Seconds a site keeps asking to be admitted: a SuperLink counts a node online until
two of its 30 s heartbeats are missed, and refuses to admit its key again until then
(a site killed with its SuperNode before it signed off, restarted at once)."""
ACTIVATION_RETRY = 2.0


def explain_exit(code: int, log_tail: str, opts: SiteOptions) -> str:
    if NOT_ACTIVATED in log_tail:
        return (f"the coordinator refused site {opts.name!r}: its key is not registered there "
                "(the coordinator admits only the sites its scenario lists, with their "
                "public keys from its certs directory), or it still counts an earlier start "
                "of this site online")
    if "could not establish a connection" in log_tail:
        return (f"lost the coordinator {opts.coordinator} and could not reconnect within "
                f"{opts.max_wait:.0f} s")
    return f"flower-supernode exited with status {code}:\n{log_tail}"


def run_site(opts: SiteOptions, say: Callable[[str], None] = print) -> None:
    """Check, connect and serve until stopped; raises with an explanation if the SuperNode
    ends on its own."""
    ca, key = check_site_files(opts)
    policy = load_policy(opts.policy).allowing(opts.allow_arch)
    opts.state.mkdir(parents=True, exist_ok=True, mode=0o700)
    site_secret(opts.state)
    probe_coordinator(Address.parse(opts.coordinator), ca, opts.connect_timeout, say)
    say(f"site {opts.name}: coordinator {opts.coordinator} verified; joining "
        f"(state in {opts.state}, SuperNode log in {opts.state / 'supernode.log'})")
    say(f"site {opts.name}: policy {opts.policy or '(default)'}: {policy.summary()}; "
        f"identity {identity(opts.state)}")
    from fedfuse.deploy.apps import client_app
    from fedfuse.deploy.warm import WarmSite

    secret = executor_secret(opts.state)
    deadline = time.monotonic() + min(ACTIVATION_PATIENCE, opts.max_wait)
    while True:
        with FlowerProcess(supernode_argv(opts, ca, key, secret),
                           opts.state / "supernode.log", opts.state / "flwr") as node:
            runtime = RuntimeTasks(f"127.0.0.1:{opts.runtime_port}", secret.read_bytes())
            try:
                WarmSite(client_app, runtime, opts.state).serve(lambda: node.poll() is None)
            finally:
                runtime.close()
            code, tail = node.wait(), node.tail(40)
        if NOT_ACTIVATED not in tail or time.monotonic() > deadline:
            raise FedfuseError(explain_exit(code, tail, opts))
        say(f"site {opts.name}: the coordinator did not admit this site yet (it may still "
            "count it online from a start that ended without signing off, until its "
            "heartbeats run out); trying again")
        time.sleep(ACTIVATION_RETRY)
