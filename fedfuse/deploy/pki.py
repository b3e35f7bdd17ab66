"""X.509 material made with ``cryptography``: a certificate authority and the TLS
certificates it signs. Private keys are written with 0600 permissions, never over an
existing file."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfuse.atomic import create_private
from fedfuse.errors import FedfuseError


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfuse"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days)))


def create_ca(common_name: str = "fedfuse CA", days: int = 3650) -> KeyPair:
    """A self-signed CA (P-256) that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(common_name, _name(common_name), key.public_key(), days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return KeyPair(key, cert)


def issue_server_cert(ca: KeyPair, hosts: list[str], days: int = 825) -> KeyPair:
    """A TLS server certificate for ``hosts`` (DNS names or IP addresses, all placed in the
    subject alternative names), signed by ``ca``."""
    if not hosts:
        raise FedfuseError("a server certificate needs at least one host name or address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(hosts[0], ca.cert.subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca.key, hashes.SHA256()))
    return KeyPair(key, cert)


def write_pem(pair: KeyPair, cert_path: Path, key_path: Path) -> None:
    """The certificate (0644) and private key (0600); refuses to overwrite either."""
    for path in (cert_path, key_path):
        if path.exists():
            raise FedfuseError(f"{path} exists; not overwriting key material")
    key_pem = pair.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    create_private(key_path, key_pem)
    cert_path.write_bytes(pair.cert.public_bytes(serialization.Encoding.PEM))
