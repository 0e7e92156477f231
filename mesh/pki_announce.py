"""Signed trust-bundle announcements: the CA signs, identity agents verify. Pure, no I/O.

Why: a bundle announcement tells every sidecar which roots to trust. If any bus client could
announce one, it could make sidecars accept certificates it minted. So an agent installs an
announced bundle only if it is signed by a key it can tie to a root it *already* trusts; its
first bundle comes with its first certificate, in the CA's reply to its join-token request.

What is signed (``signed_bytes``): a domain-separation label, the trust domain, the roots (PEM),
the signing CA (DER), the intermediates (DER) and ``issued_at``, msgpack-encoded. Each signer is
a CA certificate; ``intermediates`` lead from it to a root. The signature is ECDSA with SHA-256
for EC keys (P-256 roots, as `generate_root` makes), PKCS#1 v1.5 SHA-256 for RSA, Ed25519 for
Ed25519 operator CAs.

Rotation (``mesh ca rotate``): the overlap bundle (old + new root) is signed by both the old
root (which every agent trusts) and the new one (which is then trusted too), so agents accept
it, and later announcements signed by the new root alone. Retiring: the new root signs a
bundle without the old root. ``issued_at`` only grows (the CA never signs older than what it
stored), and an agent refuses an announcement older than the last it accepted, so a replayed
overlap bundle cannot bring a retired root back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.messages import BundleAnnounce
from mesh.pki_bundle import TrustBundle, fingerprint, is_ca_certificate
from mesh.pki_errors import IdentityError

__all__ = ["BundleRejected", "sign_announcement", "signed_bytes", "verify_announcement"]

_LABEL = b"trio-mesh trust bundle announcement v1"
_MAX_CHAIN = 4  # intermediates between a signer and a root

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class BundleRejected(IdentityError):
    """An announced bundle that is not installed: unsigned, forged, stale or foreign."""

    reason: ClassVar[str] = "bundle-rejected"


def signed_bytes(msg: BundleAnnounce) -> bytes:
    """The exact bytes every signature of ``msg`` covers (everything but leader/signatures)."""
    data: bytes = msgpack.packb(
        [
            _LABEL,
            msg.trust_domain,
            msg.roots_pem,
            msg.signing_ca,
            list(msg.intermediates),
            float(msg.issued_at),
        ],
        use_bin_type=True,
    )
    return data


def _sign(key: SigningKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def _verify(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    pub = cert.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(pub, ed25519.Ed25519PublicKey):
            pub.verify(signature, data)
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


def sign_announcement(
    msg: BundleAnnounce, signers: Sequence[tuple[x509.Certificate, SigningKey]]
) -> BundleAnnounce:
    """``msg`` with one signature per (CA certificate, its key); earlier signatures dropped."""
    if not signers:
        raise ValueError("a bundle announcement needs at least one signer")
    data = signed_bytes(msg)
    return dataclasses.replace(
        msg,
        signers=[cert.public_bytes(Encoding.DER) for cert, _ in signers],
        signatures=[_sign(key, data) for _, key in signers],
    )


def _issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    if child.issuer != issuer.subject:
        return False
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _leads_to_trusted(
    signer: x509.Certificate, intermediates: Sequence[x509.Certificate], trusted: TrustBundle
) -> bool:
    """Is ``signer`` a trusted root, or issued (through ``intermediates``) by one?"""
    current = signer
    path = list(intermediates)
    for _ in range(_MAX_CHAIN + 1):
        if not is_ca_certificate(current):
            return False
        if current in trusted:
            return True
        if any(_issued_by(current, root) for root in trusted.issuers_named(current.issuer)):
            return True
        parents = [c for c in path if _issued_by(current, c)]
        if not parents:
            return False
        current = parents[0]
        path.remove(current)
    return False


def verify_announcement(
    msg: BundleAnnounce, trusted: TrustBundle, *, last_issued_at: float = 0.0
) -> TrustBundle:
    """The announced bundle, if ``msg`` is signed by a key that chains to a root of
    ``trusted`` and is not older than ``last_issued_at``; BundleRejected (saying why) if not."""
    if msg.trust_domain != trusted.trust_domain:
        raise BundleRejected(
            f"announcement for trust domain {msg.trust_domain!r}, not {trusted.trust_domain!r}"
        )
    if not msg.signatures:
        raise BundleRejected("announcement is not signed")
    if len(msg.signers) != len(msg.signatures):
        raise BundleRejected("announcement has a different number of signers and signatures")
    if msg.issued_at < last_issued_at:
        raise BundleRejected(
            f"announcement issued at {msg.issued_at:.3f} is older than the bundle in use "
            f"({last_issued_at:.3f}): a replay"
        )
    try:
        chain = [x509.load_der_x509_certificate(der) for der in msg.intermediates]
        signers = [x509.load_der_x509_certificate(der) for der in msg.signers]
    except ValueError as exc:
        raise BundleRejected(
            f"announcement carries a certificate that does not parse: {exc}"
        ) from None
    data = signed_bytes(msg)
    tried = []
    for signer, signature in zip(signers, msg.signatures, strict=True):
        tried.append(fingerprint(signer)[:16])
        if _leads_to_trusted(signer, chain, trusted) and _verify(signer, signature, data):
            return TrustBundle.from_pem(msg.trust_domain, msg.roots_pem)
    raise BundleRejected(
        f"announcement not signed by a trusted root (signers {', '.join(tried)}; trusted "
        f"{', '.join(fp[:16] for fp in trusted.fingerprints())})"
    )
