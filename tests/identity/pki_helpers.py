"""Helpers shared by the identity tests: issue real SVIDs, forge attacker certificates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh import pki
from mesh.spiffe import SpiffeId

TD = "example.org"
NOW = datetime.now(UTC)


def issue(
    ca: pki.CertificateAuthority,
    identity: SpiffeId,
    *,
    ttl: timedelta = pki.DEFAULT_LEAF_TTL,
    now: datetime | None = None,
) -> pki.Svid:
    """The full path a sidecar takes: key, CSR, CA checks and signs."""
    key = pki.generate_key()
    issued = ca.sign_csr(pki.build_csr(key, identity), identity, ttl=ttl, now=now)
    return pki.Svid(issued, key)


def forge_self_signed(identity: SpiffeId, *, issuer: x509.Name | None = None) -> pki.Svid:
    """An attacker's leaf: SVID-shaped, copied SPIFFE URI, signed by the attacker's own key.

    With ``issuer`` set to the real root's name it pretends to be issued by the real CA.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]) if issuer else name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return pki.Svid(pki.IssuedSvid(identity, (cert,)), key)
