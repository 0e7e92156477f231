"""The signing CA: generate a root, or load an operator's root/intermediate; sign SVIDs.

``CertificateAuthority.sign_csr`` is the hot path of the certificate flow. Everything that does
not depend on the request is computed once per CA and kept: the issuer name, the
AuthorityKeyIdentifier, the constant leaf extensions, the hash algorithm and the DER of the
intermediates. Per request there is one CSR parse, one ECDSA verify (CSR), one SKI hash and one
sign (leaf).

What a leaf looks like (X509-SVID): empty subject and a *critical* SAN holding exactly one URI
``spiffe://<td>/ns/<ns>/sa/<sa>`` (RFC 5280: an empty subject requires a critical SAN; this is
what Istio does), BasicConstraints CA=false (critical), KeyUsage digitalSignature only
(critical), EKU serverAuth + clientAuth, random 159-bit serial, validity ``now - skew`` to
``now + ttl`` clipped to the CA's own ``not_after``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.pki_bundle import TrustBundle, is_ca_certificate
from mesh.pki_csr import ALLOWED_CURVES, checked_csr_key
from mesh.pki_errors import CaLoadError, CsrWrongIdentity
from mesh.pki_svid import IssuedSvid
from mesh.spiffe import SCHEME_PREFIX, SpiffeId, validate_trust_domain

__all__ = [
    "CLOCK_SKEW",
    "DEFAULT_LEAF_TTL",
    "DEFAULT_ROOT_TTL",
    "MIN_LEAF_TTL",
    "CaPrivateKey",
    "CertificateAuthority",
    "generate_intermediate",
    "generate_root",
    "load_ca",
]

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

DEFAULT_LEAF_TTL = timedelta(hours=24)
MIN_LEAF_TTL = timedelta(minutes=1)
DEFAULT_ROOT_TTL = timedelta(days=365)
# Leaves start this much in the past so a peer whose clock is a little behind accepts them.
CLOCK_SKEW = timedelta(seconds=30)

_LEAF_BASIC = x509.BasicConstraints(ca=False, path_length=None)
_LEAF_KU = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_CA_KU = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_EMPTY_NAME = x509.Name([])


@functools.lru_cache(maxsize=4096)
def _san_for(identity: SpiffeId) -> x509.SubjectAlternativeName:
    # Workloads renew every ~12 h with the same identity: building the SAN once is enough.
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)])


def _hash_for(key: CaPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # Ed25519 signs without a separate hash
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _spki(key: CaPrivateKey | x509.Certificate) -> bytes:
    pub = key.public_key()
    return pub.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and _signed_by(cert, cert)


class CertificateAuthority:
    """A signing key and its certificate, plus the roots peers must trust.

    ``intermediates`` are the certificates between the CA certificate and the root (they are
    appended to every issued chain). ``roots`` form the trust bundle; if the CA certificate is
    itself a root it is the bundle.
    """

    def __init__(
        self,
        trust_domain: str,
        key: CaPrivateKey,
        certificate: x509.Certificate,
        *,
        intermediates: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate] = (),
        allowed_curves: frozenset[str] = ALLOWED_CURVES,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
        ):
            raise CaLoadError(
                f"CA key type {type(key).__name__} is not supported (use ECDSA, RSA or Ed25519)"
            )
        if not is_ca_certificate(certificate):
            raise CaLoadError(
                f"CA certificate {certificate.subject.rfc4514_string()!r} is not a CA "
                "(needs BasicConstraints CA=true and KeyUsage keyCertSign)"
            )
        if _spki(key) != _spki(certificate):
            raise CaLoadError(
                f"CA private key does not match the certificate "
                f"{certificate.subject.rfc4514_string()!r}"
            )
        self._key = key
        self._certificate = certificate
        self._intermediates = tuple(intermediates)
        all_roots = list(roots)
        if _is_self_signed(certificate) and certificate not in all_roots:
            all_roots.insert(0, certificate)
        self._bundle = TrustBundle(self.trust_domain, all_roots)
        top = self._intermediates[-1] if self._intermediates else certificate
        if not _is_self_signed(top) and not any(
            _signed_by(top, root) for root in self._bundle.issuers_named(top.issuer)
        ):
            # Leaves signed here would verify nowhere: refuse at load, not at first handshake.
            raise CaLoadError(
                f"CA chain ends at {top.subject.rfc4514_string()!r}, issued by "
                f"{top.issuer.rfc4514_string()!r}, which is not a root of the trust bundle"
            )
        self.allowed_curves = allowed_curves
        # --- cached per CA: none of this depends on the request --------------------------------
        self._hash = _hash_for(key)
        self._issuer = certificate.subject
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._tail: tuple[x509.Certificate, ...] = (
            () if _is_self_signed(certificate) else (certificate, *self._intermediates)
        )
        self._not_after = certificate.not_valid_after_utc

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority({self.trust_domain!r}, "
            f"{self._certificate.subject.rfc4514_string()!r}, "
            f"not_after={self._not_after.isoformat()})"
        )

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def key(self) -> CaPrivateKey:
        """The signing key. Only ``mesh.pki_seal`` should need it."""
        return self._key

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        return self._intermediates

    @property
    def bundle(self) -> TrustBundle:
        return self._bundle

    @property
    def not_after(self) -> datetime:
        return self._not_after

    def chain_pem(self) -> bytes:
        """CA certificate + intermediates as PEM (what ``load_ca`` reads back)."""
        certs = (self._certificate, *self._intermediates)
        return b"".join(c.public_bytes(Encoding.PEM) for c in certs)

    def with_roots(self, roots: Sequence[x509.Certificate]) -> CertificateAuthority:
        """Same key and certificate, a different trust bundle (rotation overlap/retire)."""
        return CertificateAuthority(
            self.trust_domain,
            self._key,
            self._certificate,
            intermediates=self._intermediates,
            roots=roots,
            allowed_curves=self.allowed_curves,
        )

    def sign_csr(
        self,
        csr: bytes | x509.CertificateSigningRequest,
        identity: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> IssuedSvid:
        """Check ``csr`` (signature, exactly ``identity``, allowed key) and sign it.

        ``identity`` is what the caller's credential (join token or renewal proof) allows; the
        CSR must ask for exactly that. Raises a ``CsrRefused`` subclass.
        """
        if identity.trust_domain != self.trust_domain:
            raise CsrWrongIdentity(
                f"{identity} is outside this CA's trust domain {self.trust_domain!r}"
            )
        _, pub = checked_csr_key(csr, identity, allowed_curves=self.allowed_curves)
        return self.issue(identity, pub, ttl=ttl, now=now)

    def issue(
        self,
        identity: SpiffeId,
        public_key: ec.EllipticCurvePublicKey,
        *,
        ttl: timedelta = DEFAULT_LEAF_TTL,
        now: datetime | None = None,
    ) -> IssuedSvid:
        """Sign a leaf for an already vetted key. Callers outside this module want sign_csr."""
        if ttl < MIN_LEAF_TTL:
            raise CaLoadError(f"leaf TTL {ttl} is below the minimum of {MIN_LEAF_TTL}")
        if now is None:
            now = datetime.now(UTC)
        not_before = max(now - CLOCK_SKEW, self._certificate.not_valid_before_utc)
        not_after = min(now + ttl, self._not_after)
        if not_after <= now:
            raise CaLoadError(f"CA certificate expired at {self._not_after.isoformat()}")
        cert = (
            x509.CertificateBuilder(
                issuer_name=self._issuer,
                subject_name=_EMPTY_NAME,
                public_key=public_key,
                serial_number=x509.random_serial_number(),
                not_valid_before=not_before,
                not_valid_after=not_after,
            )
            .add_extension(_LEAF_BASIC, critical=True)
            .add_extension(_LEAF_KU, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(_san_for(identity), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, self._hash)
        )
        return IssuedSvid(identity, (cert, *self._tail))


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder(
            issuer_name=issuer,
            subject_name=subject,
            public_key=public_key,
            serial_number=x509.random_serial_number(),
            not_valid_before=not_before,
            not_valid_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            # SPIFFE: a signing certificate may carry the trust domain's own ID.
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"{SCHEME_PREFIX}{trust_domain}")]
            ),
            critical=False,
        )
    )


def generate_root(
    trust_domain: str,
    *,
    ttl: timedelta = DEFAULT_ROOT_TTL,
    now: datetime | None = None,
    allowed_curves: frozenset[str] = ALLOWED_CURVES,
) -> CertificateAuthority:
    """A new self-signed ECDSA P-256 root for ``trust_domain`` (first start, or ``ca rotate``).

    Each root gets a distinct subject CN (a random suffix) so that, during a rotation overlap,
    tools and logs can tell the two roots apart; chain building matches by name + signature.
    """
    validate_trust_domain(trust_domain)
    if now is None:
        now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    tag = f"{x509.random_serial_number():x}"[:12]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trio-mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"trio-mesh root {tag}"),
        ]
    )
    cert = _ca_builder(
        name, name, key.public_key(), trust_domain, now - CLOCK_SKEW, now + ttl, 1
    ).sign(key, hashes.SHA256())
    return CertificateAuthority(trust_domain, key, cert, allowed_curves=allowed_curves)


def generate_intermediate(
    parent: CertificateAuthority,
    *,
    ttl: timedelta = DEFAULT_ROOT_TTL,
    now: datetime | None = None,
) -> CertificateAuthority:
    """An intermediate CA signed by ``parent`` (for tests and for operators who keep the root
    offline: sign an intermediate once, give the mesh only the intermediate's key)."""
    if now is None:
        now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    tag = f"{x509.random_serial_number():x}"[:12]
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trio-mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"trio-mesh intermediate {tag}"),
        ]
    )
    not_after = min(now + ttl, parent.not_after)
    builder = _ca_builder(
        name,
        parent.certificate.subject,
        key.public_key(),
        parent.trust_domain,
        now - CLOCK_SKEW,
        not_after,
        0,
    ).add_extension(parent._aki, critical=False)
    cert = builder.sign(parent.key, parent._hash)
    return CertificateAuthority(
        parent.trust_domain,
        key,
        cert,
        intermediates=(*parent._tail,),
        roots=parent.bundle.roots,
        allowed_curves=parent.allowed_curves,
    )


def load_ca(
    trust_domain: str,
    cert_pem: bytes,
    key_pem: bytes,
    *,
    password: bytes | None = None,
    bundle_pem: bytes | None = None,
    allowed_curves: frozenset[str] = ALLOWED_CURVES,
) -> CertificateAuthority:
    """Load an operator's CA: ``cert_pem`` is the CA cert, then its chain up to (optionally)
    the root; ``key_pem`` its key (``password`` if encrypted). If the CA is an intermediate and
    the root is not in ``cert_pem``, pass the roots as ``bundle_pem``.

    Every error is a ``CaLoadError`` naming what is wrong with which file content.
    """
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise CaLoadError(f"CA certificate file is not PEM certificates: {exc}") from None
    try:
        key = load_pem_private_key(key_pem, password)
    except TypeError as exc:  # password missing / given for an unencrypted key
        raise CaLoadError(f"CA key file: {exc}") from None
    except ValueError as exc:
        raise CaLoadError(f"CA key file does not load (bad PEM or wrong password): {exc}") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise CaLoadError(f"CA key type {type(key).__name__} is not supported")
    ca_cert, rest = certs[0], list(certs[1:])
    if not is_ca_certificate(ca_cert):
        shown = ca_cert.subject.rfc4514_string() or "empty subject"
        raise CaLoadError(
            f"first certificate in the CA file ({shown}) is not a CA (needs BasicConstraints "
            "CA=true and keyCertSign)"
        )
    for child, parent in itertools.pairwise(certs):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise CaLoadError(
                f"CA chain is out of order or broken: {child.subject.rfc4514_string()!r} is "
                f"not signed by {parent.subject.rfc4514_string()!r} (list the CA certificate "
                "first, then each issuer)"
            ) from None
    roots: list[x509.Certificate] = []
    if rest and _is_self_signed(rest[-1]):
        roots.append(rest.pop())
    if bundle_pem:
        try:
            roots.extend(x509.load_pem_x509_certificates(bundle_pem))
        except ValueError as exc:
            raise CaLoadError(f"trust bundle file is not PEM certificates: {exc}") from None
    if not roots and not _is_self_signed(ca_cert):
        raise CaLoadError(
            f"CA {ca_cert.subject.rfc4514_string()!r} is an intermediate but no root was "
            "given: append the root to the certificate file or pass a bundle"
        )
    return CertificateAuthority(
        trust_domain,
        key,
        ca_cert,
        intermediates=rest,
        roots=roots,
        allowed_curves=allowed_curves,
    )
