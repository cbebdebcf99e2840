"""A throwaway PKI for the TLS tests: a CA, server certificates for given names, a client certificate,
and a second CA that signed none of them (the "wrong CA"). Written as PEM files, as Mosquitto reads them."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    pair = Pair(folder / f"{stem}.crt", folder / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pair.key.chmod(0o600)
    return pair


class Pki:
    """``ca``; ``server(stem, names)``; ``client(stem)``; all valid for a day from an hour ago."""

    def __init__(self, folder: Path, ca_name: str = "edge-test-ca") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self._valid = (now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
        cert = (x509.CertificateBuilder().subject_name(_name(ca_name)).issuer_name(_name(ca_name))
                .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(self._valid[0]).not_valid_after(self._valid[1])
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(self._ca_key, hashes.SHA256()))
        self._ca_cert = cert
        self.ca = _write(folder, ca_name, cert, self._ca_key)

    def _issue(self, stem: str, cn: str, usage: x509.ObjectIdentifier,
               names: list[x509.GeneralName]) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self._ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(self._valid[0]).not_valid_after(self._valid[1])
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _write(self.folder, stem, builder.sign(self._ca_key, hashes.SHA256()), key)

    def server(self, stem: str, dns: list[str], ips: tuple[str, ...] = ()) -> Pair:
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(stem, dns[0] if dns else "server", ExtendedKeyUsageOID.SERVER_AUTH, names)

    def client(self, stem: str) -> Pair:
        return self._issue(stem, stem, ExtendedKeyUsageOID.CLIENT_AUTH, [])
