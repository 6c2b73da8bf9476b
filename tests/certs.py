"""A throwaway CA and certificates, made at test time, for TLS and mutual-TLS tests."""

import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: pathlib.Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """A CA (`ca.pem`) and, per name, a certificate valid for that name, localhost and 127.0.0.1.
    Returns {name: (cert_path, key_path)} and {"ca": (ca_path, "")}."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _key()
    ca_cert = (x509.CertificateBuilder().subject_name(_name("splitspec test CA")).issuer_name(_name("splitspec test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    paths = {"ca": (str(directory / "ca.pem"), "")}
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = _key()
        alt_names = x509.SubjectAlternativeName([x509.DNSName(name), x509.DNSName("localhost"),
                                                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(alt_names, critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        paths[name] = (str(cert_path), str(key_path))
    return paths
