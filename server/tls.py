"""A development certificate authority for MQTT over TLS: `serve --mqtt-tls` makes one in DATA/tls on first start.

The CA signs the broker's certificate (for the hosts devices connect to) and, with `--mqtt-client-certs`, one
client certificate per device (its common name is the device id) and one for the coordinator. Keys are EC P-256,
written owner-only. For production, put certificates from your own CA at the same paths.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tinymlaas.private import write_private

CA_YEARS, LEAF_DAYS = 10, 825


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the CA's certificate: what clients verify the broker with
    cert: Path  # the broker's certificate and key
    key: Path


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, public_key, issuer: x509.Name, signing_key, days: int, ca: bool, usage=None, hosts=()):
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(signing_key, hashes.SHA256())


class DevCA:
    def __init__(self, folder: Path):
        self.dir = Path(folder)

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    def _ca(self):
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        return x509.load_pem_x509_certificate(self.ca_cert.read_bytes()), key

    def ensure(self, hosts) -> TlsFiles:
        """The CA (made once) and a broker certificate valid for `hosts` (made again when the hosts change)."""
        if not self.ca_cert.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tinymlaas development CA")])
            cert = _cert("tinymlaas development CA", key.public_key(), name, key, 365 * CA_YEARS, ca=True)
            write_private(self.dir / "ca.key", _key_pem(key))
            self.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files = TlsFiles(self.ca_cert, self.dir / "broker.pem", self.dir / "broker.key")
        hosts = sorted(set(hosts))
        if not files.cert.exists() or _hosts(files.cert) != hosts:
            cert_pem, key_pem = self.issue(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)
            write_private(files.key, key_pem)
            files.cert.write_bytes(cert_pem)
        return files

    def issue(self, name: str, usage=ExtendedKeyUsageOID.CLIENT_AUTH, hosts=()) -> tuple[bytes, bytes]:
        """A certificate (PEM) for `name` signed by the CA, and its new private key (PEM)."""
        ca, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key.public_key(), ca.subject, ca_key, LEAF_DAYS, ca=False, usage=usage, hosts=hosts)
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _hosts(cert_path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(n.value) for n in san])
