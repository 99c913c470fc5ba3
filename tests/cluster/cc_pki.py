"""A test stand-in for NVIDIA's device PKI: a root CA, a GPU's leaf key and certificate, and
a signer that makes SPDM-shaped reports (4 header bytes, the 32-byte nonce, measurements,
an ECDSA P-384 signature r ‖ s over the rest), as `SignedReportVerifier` reads them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None), True)
        .sign(signer, hashes.SHA384())
    )


@dataclass
class DevicePki:
    root: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf: x509.Certificate

    @classmethod
    def make(cls, name: str = "Test GPU Root CA") -> DevicePki:
        root_key = ec.generate_private_key(ec.SECP384R1())
        root = _cert(name, root_key, name, root_key)
        leaf_key = ec.generate_private_key(ec.SECP384R1())
        leaf = _cert("GH100 device", leaf_key, name, root_key)
        return cls(root, leaf_key, leaf)

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.leaf, self.root))

    def sign_report(self, index: int, nonce: bytes) -> tuple[bytes, bytes]:
        body = b"\x11\xe0\x00\x01" + nonce + secrets.token_bytes(64)
        der = self.leaf_key.sign(body, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return body + r.to_bytes(48, "big") + s.to_bytes(48, "big"), self.chain_pem()
