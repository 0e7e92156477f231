"""Both ends of a CSR: the sidecar makes key + CSR, the CA checks it before signing.

Sidecar side: ``generate_key()`` then ``build_csr(key, identity)`` -> DER bytes for the bus.
CA side: ``check_csr(der, expected)`` returns the parsed CSR or raises a ``CsrRefused``
subclass. Checks run cheapest first (parse, key type, SAN) so junk is refused before the ECDSA
verification, which is the expensive step.

Renewal: a sidecar with a still-valid SVID proves it by signing the new CSR with its *current*
key (``renewal_proof``); the CA verifies the current chain against the bundle and the proof
(``verify_renewal``). So a one-use join token is only needed for the very first certificate.
A replayed renewal is harmless: it yields a certificate for a key only the sidecar holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.pki_bundle import TrustBundle
from mesh.pki_errors import (
    CsrBadSignature,
    CsrKeyNotAllowed,
    CsrMalformed,
    CsrWrongIdentity,
    RenewalProofInvalid,
)
from mesh.pki_svid import Svid
from mesh.pki_verify import verify_svid
from mesh.spiffe import SpiffeId

__all__ = [
    "ALLOWED_CURVES",
    "build_csr",
    "check_csr",
    "checked_csr_key",
    "generate_key",
    "load_csr",
    "renewal_proof",
    "verify_renewal",
]

# Leaves are ECDSA P-256 (issue 5). A set so an operator could widen it, e.g. to P-384.
ALLOWED_CURVES: frozenset[str] = frozenset({"secp256r1"})

_EMPTY_NAME = x509.Name([])
_SHA256 = hashes.SHA256()
_ECDSA_SHA256 = ec.ECDSA(_SHA256)
_RENEWAL_CONTEXT = b"trio-mesh renewal proof v1\x00"
_MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is ~300 bytes; refuse absurd input before parsing


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key, in memory only."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> bytes:
    """DER CSR with an empty subject and exactly one URI SAN, signed by ``key``."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_EMPTY_NAME)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
        .sign(key, _SHA256)
    )
    return csr.public_bytes(Encoding.DER)


def load_csr(data: bytes | x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    """Parse DER (or PEM, recognized by its header) into a CSR; ``CsrMalformed`` otherwise."""
    if isinstance(data, x509.CertificateSigningRequest):
        return data
    if len(data) > _MAX_CSR_BYTES:
        raise CsrMalformed(f"CSR is {len(data)} bytes, more than {_MAX_CSR_BYTES}")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CsrMalformed(f"CSR does not parse: {exc}") from None


def check_csr(
    data: bytes | x509.CertificateSigningRequest,
    expected: SpiffeId,
    *,
    allowed_curves: frozenset[str] = ALLOWED_CURVES,
) -> x509.CertificateSigningRequest:
    """Refuse unless the CSR is well signed, for exactly ``expected``, with an allowed key.

    Extensions other than the SAN are ignored: the CA decides every extension of the leaf.
    """
    return checked_csr_key(data, expected, allowed_curves=allowed_curves)[0]


def checked_csr_key(
    data: bytes | x509.CertificateSigningRequest,
    expected: SpiffeId,
    *,
    allowed_curves: frozenset[str] = ALLOWED_CURVES,
) -> tuple[x509.CertificateSigningRequest, ec.EllipticCurvePublicKey]:
    """``check_csr`` that also returns the parsed public key (the CA's hot path: building the
    key object costs as much as the SAN checks, so it is done once)."""
    csr = load_csr(data)
    try:
        pub = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrKeyNotAllowed(f"CSR public key is not usable: {exc}") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise CsrKeyNotAllowed(
            f"CSR key is {type(pub).__name__.removesuffix('PublicKey') or 'unknown'}; only "
            f"ECDSA keys on {', '.join(sorted(allowed_curves))} are accepted"
        )
    if pub.curve.name not in allowed_curves:
        raise CsrKeyNotAllowed(
            f"CSR key is on curve {pub.curve.name}; allowed: {', '.join(sorted(allowed_curves))}"
        )
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrMalformed(
            f"CSR carries no SubjectAlternativeName; it must carry exactly the URI SAN "
            f"{expected.uri}"
        ) from None
    except ValueError as exc:  # duplicate or undecodable extensions
        raise CsrMalformed(f"CSR extensions do not parse: {exc}") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or len(uris) != 1:
        raise CsrMalformed(
            f"CSR has {len(names)} SAN entries ({len(uris)} URI); it must carry exactly one, "
            f"the URI {expected.uri}"
        )
    if uris[0] != expected.uri:
        raise CsrWrongIdentity(
            f"CSR asks for {uris[0]!r} but the credential only allows {expected.uri}"
        )
    if not csr.is_signature_valid:
        raise CsrBadSignature(
            f"CSR for {expected.uri} has a signature that does not verify with its own key"
        )
    return csr, pub


def renewal_proof(current: Svid, csr_der: bytes) -> bytes:
    """Signature of the new CSR by the sidecar's current (still valid) SVID key."""
    return current.key.sign(_RENEWAL_CONTEXT + csr_der, _ECDSA_SHA256)


def verify_renewal(
    chain: Sequence[x509.Certificate],
    proof: bytes,
    csr_der: bytes,
    bundle: TrustBundle,
    identity: SpiffeId,
    *,
    now: datetime | None = None,
) -> None:
    """Accept a renewal: ``chain`` is a valid SVID of ``identity`` and signed ``csr_der``.

    Raises a ``CertificateRefused`` subclass for the chain, ``RenewalProofInvalid`` for the
    signature. The CSR itself is checked by ``check_csr`` when signing, as for a first issue.
    """
    verify_svid(chain, bundle, expected=identity, now=now)
    pub = chain[0].public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise RenewalProofInvalid(f"current certificate of {identity} has a non-ECDSA key")
    try:
        pub.verify(proof, _RENEWAL_CONTEXT + csr_der, _ECDSA_SHA256)
    except InvalidSignature:
        raise RenewalProofInvalid(
            f"renewal for {identity} is not signed by the key of its current certificate"
        ) from None
