"""``fedfuse certs init`` and ``certs add-site``: the coordinator's key material.

Layout (see docs/deployment.md)::

    ca.pem                     the CA certificate: every party trusts it
    ca.key                     the CA's private key (0600): keep it offline
    coordinator/server.pem     the coordinator's TLS certificate (SANs: --host names)
    coordinator/server.key     its private key (0600)
    sites/<name>/auth.pub      a site's public node-authentication key (``add-site``):
                               the coordinator admits only these
    sites/<name>/auth.key      only with ``init --demo-sites``: a site key pair made at
                               the coordinator, for the one-machine walk-through

A real site makes its key pair itself (``fedfuse site init``, ``fedfuse.deploy.site``):
its private key never leaves it. Re-running ``init`` adds what is missing and never
replaces a key.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedfuse.atomic import atomic_write_bytes, create_private
from fedfuse.config import SITE_NAME
from fedfuse.deploy.pki import KeyPair, create_ca, issue_server_cert, write_pem
from fedfuse.errors import FedfuseError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def check_site_name(name: str) -> str:
    """``name`` if it is a valid site name (letters, digits, ``_ . -``; 1-63 characters)."""
    if not SITE_NAME.match(name):
        raise FedfuseError(f"site name {name!r} is not valid: use 1-63 letters, digits, "
                           "'_', '.' or '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class CertsDir:
    """Paths inside a certificates directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "coordinator" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "coordinator" / "server.key"

    def site_key(self, name: str) -> Path:
        return self.root / "sites" / name / "auth.key"

    def site_public_key(self, name: str) -> Path:
        return self.root / "sites" / name / "auth.pub"

    def sites(self) -> list[str]:
        """Sites with a public key here."""
        base = self.root / "sites"
        return sorted(p.parent.name for p in base.glob("*/auth.pub")) if base.is_dir() else []


def init_certs(root: Path, sites: list[str], hosts: list[str]) -> list[str]:
    """Create what is missing under ``root``: the CA, the coordinator's certificate for
    ``hosts`` and, for the one-machine walk-through only (``--demo-sites``), a
    node-authentication key pair per site in ``sites``. Returns the files created.

    Existing keys are kept; an existing coordinator certificate whose names differ from
    ``hosts`` is refused rather than replaced (delete ``coordinator/`` to reissue it)."""
    for name in sites:
        check_site_name(name)
    d = CertsDir(root)
    created: list[str] = []
    root.mkdir(parents=True, exist_ok=True)
    if d.ca_cert.exists() != d.ca_key.exists():
        raise FedfuseError(f"{root}: one of ca.pem and ca.key is missing; restore it from "
                           "backup (a new CA would invalidate every certificate)")
    if d.ca_cert.exists():
        ca = load_ca(d)
    else:
        ca = create_ca()
        write_pem(ca, d.ca_cert, d.ca_key)
        created += [str(d.ca_cert), str(d.ca_key)]
    hosts = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    if d.server_cert.exists():
        have = certificate_hosts(x509.load_pem_x509_certificate(d.server_cert.read_bytes()))
        if set(have) != set(hosts):
            raise FedfuseError(f"{d.server_cert} exists for {', '.join(have)}, not "
                               f"{', '.join(hosts)}; delete {d.server_cert.parent} to issue "
                               "a new coordinator certificate")
    else:
        d.server_cert.parent.mkdir(exist_ok=True)
        write_pem(issue_server_cert(ca, hosts), d.server_cert, d.server_key)
        created += [str(d.server_cert), str(d.server_key)]
    for name in sites:
        if d.site_key(name).exists():
            continue
        d.site_key(name).parent.mkdir(parents=True, exist_ok=True)
        write_auth_key(ec.generate_private_key(ec.SECP384R1()), d.site_key(name),
                       d.site_public_key(name))
        created += [str(d.site_key(name)), str(d.site_public_key(name))]
    return created


def load_ca(d: CertsDir) -> KeyPair:
    key = serialization.load_pem_private_key(d.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FedfuseError(f"{d.ca_key}: not an EC private key")
    return KeyPair(key, x509.load_pem_x509_certificate(d.ca_cert.read_bytes()))


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return ([str(n) for n in san.get_values_for_type(x509.DNSName)]
            + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def write_auth_key(key: ec.EllipticCurvePrivateKey, key_path: Path, pub_path: Path) -> None:
    """A node-authentication key pair in OpenSSH format (Flower's SuperNode reads the
    private key, ``flwr supernode register`` the public one); the private key is 0600
    and never overwrites a file."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    create_private(key_path, data)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                       serialization.PublicFormat.OpenSSH)
                         + b"\n")


def check_server_certificate(d: CertsDir, now: dt.datetime | None = None) -> None:
    """Refuse to start a coordinator whose certificate is missing, not yet or no longer
    valid, not signed by the directory's CA, or not matching its private key."""
    for path in (d.ca_cert, d.server_cert, d.server_key):
        if not path.is_file():
            raise FedfuseError(f"{path} is missing; run `fedfuse certs init {d.root}` "
                               "first")
    ca = x509.load_pem_x509_certificate(d.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(d.server_cert.read_bytes())
    now = now or dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise FedfuseError(f"{d.server_cert} is valid from {cert.not_valid_before_utc:%Y-%m-%d}"
                           f" to {cert.not_valid_after_utc:%Y-%m-%d}, not now; delete "
                           f"{d.server_cert.parent} and run `fedfuse certs init` again")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise FedfuseError(f"{d.server_cert} is not signed by {d.ca_cert} "
                           f"({type(exc).__name__})") from None
    key = serialization.load_pem_private_key(d.server_key.read_bytes(), password=None)
    if key.public_key() != cert.public_key():
        raise FedfuseError(f"{d.server_key} does not belong to {d.server_cert}")


def load_site_public_key(d: CertsDir, name: str) -> bytes:
    """The OpenSSH public key of site ``name``, checked to be an EC key on a NIST curve."""
    path = d.site_public_key(name)
    if not path.is_file():
        raise FedfuseError(f"site {name!r} has no public key at {path}; the site runs "
                           f"`fedfuse site init --name {name}` and you register its "
                           f"auth.pub with `fedfuse certs add-site {d.root} --name {name} "
                           "--pub FILE`")
    return check_public_key(path.read_bytes(), str(path))


def check_public_key(data: bytes, where: str) -> bytes:
    """``data`` if it is an OpenSSH EC public key on a NIST curve (what Flower's node
    authentication takes)."""
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, IndexError) as exc:
        raise FedfuseError(f"{where}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FedfuseError(f"{where}: node authentication needs an EC key (P-256/384/521)")
    return data


def add_site(root: Path, name: str, public_key: Path) -> Path:
    """Register site ``name``'s public key (made at the site by ``fedfuse site init``) in
    the certificates directory ``root``; the same key again is a no-op, another key for
    a registered name is refused (remove ``sites/NAME/`` first to rotate it)."""
    check_site_name(name)
    d = CertsDir(root)
    if not d.ca_cert.is_file():
        raise FedfuseError(f"{root} has no ca.pem: run `fedfuse certs init {root}` first")
    try:
        data = check_public_key(public_key.read_bytes(), str(public_key))
    except OSError as exc:
        raise FedfuseError(f"cannot read {public_key}: {exc.strerror}") from None
    target = d.site_public_key(name)
    if target.exists():
        if target.read_bytes().split() == data.split():
            return target
        raise FedfuseError(f"site {name!r} is registered with another key at {target}; "
                           f"remove {target.parent} first to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, data)
    return target

