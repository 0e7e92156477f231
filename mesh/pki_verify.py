"""Verify a peer's X509-SVID chain against a trust bundle, with typed refusals.

Two entry points:

* ``verify_svid(chain, bundle, expected=...)``: full verification in Python (chain building,
  signatures, validity windows, SVID shape, trust domain, expected identity). Used where no TLS
  library did the work: the CA checking a renewal proof, ``mesh certs``, tests.
* ``check_peer_leaf(der, trust_domain=..., expected=...)``: after a TLS handshake. OpenSSL has
  already verified the chain to the bundle and the validity dates, but Python's ``ssl`` cannot
  check URI SANs, so this checks the SVID shape, trust domain and expected identity of the
  leaf from ``getpeercert(binary_form=True)``.

Order of checks (first failure wins, so the reason is the most useful one): SVID shape ->
trust domain -> issuer chain and signatures -> validity dates -> expected identity. A forged
certificate therefore reports ``unknown-issuer`` even if it also names the wrong workload.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mesh.pki_bundle import TrustBundle, is_ca_certificate
from mesh.pki_errors import (
    BadChain,
    CertExpired,
    CertNotYetValid,
    NotAnSvid,
    SpiffeIdError,
    UnknownIssuer,
    WrongIdentity,
    WrongTrustDomain,
)
from mesh.spiffe import SCHEME_PREFIX, SpiffeId, parse_spiffe_id

__all__ = ["MAX_CHAIN_DEPTH", "check_peer_leaf", "spiffe_id_of", "verify_svid"]

MAX_CHAIN_DEPTH = 5  # leaf + intermediates; real meshes use 1-2, more is a misconfiguration


def _describe(cert: x509.Certificate) -> str:
    try:
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) == 1:
        return uris[0]
    subject = cert.subject.rfc4514_string()
    return f"subject {subject!r}" if subject else f"serial {cert.serial_number:x}"


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X509-SVID leaf; ``NotAnSvid`` if it is not a well-formed SVID leaf.

    Checks the X509-SVID rules a leaf must follow: exactly one URI SAN holding a SPIFFE ID,
    CA=false, KeyUsage with digitalSignature and without keyCertSign/cRLSign.
    """
    exts = cert.extensions
    try:
        san = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NotAnSvid(
            f"certificate {_describe(cert)} has no URI SAN: not a SPIFFE X509-SVID"
        ) from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise NotAnSvid(
            f"certificate {_describe(cert)} has {len(uris)} URI SANs: an X509-SVID has exactly one"
        )
    if not uris[0].startswith(SCHEME_PREFIX):
        raise NotAnSvid(f"certificate URI SAN {uris[0]!r} is not a spiffe:// ID")
    try:
        ident = parse_spiffe_id(uris[0])
    except SpiffeIdError as exc:
        raise NotAnSvid(f"certificate URI SAN is not a valid mesh SPIFFE ID: {exc}") from None
    try:
        if exts.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise NotAnSvid(f"certificate {ident} is a CA certificate, not a workload SVID")
    except x509.ExtensionNotFound:
        pass
    try:
        ku = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise NotAnSvid(
            f"certificate {ident} has no KeyUsage: an X509-SVID needs digitalSignature"
        ) from None
    if not ku.digital_signature:
        raise NotAnSvid(f"certificate {ident} lacks the digitalSignature key usage")
    if ku.key_cert_sign or ku.crl_sign:
        raise NotAnSvid(f"certificate {ident} has keyCertSign/cRLSign: a leaf SVID must not")
    return ident


def _check_trust_domain(ident: SpiffeId, trust_domain: str) -> None:
    if ident.trust_domain != trust_domain:
        raise WrongTrustDomain(
            f"certificate {ident} belongs to trust domain {ident.trust_domain!r}, this mesh "
            f"trusts {trust_domain!r}"
        )


def _check_expected(ident: SpiffeId, expected: SpiffeId | None) -> None:
    if expected is not None and ident != expected:
        raise WrongIdentity(f"peer is {ident}, expected {expected}")


def _check_dates(cert: x509.Certificate, now: datetime, what: str) -> None:
    nb = cert.not_valid_before_utc
    na = cert.not_valid_after_utc
    if now < nb:
        raise CertNotYetValid(
            f"{what} {_describe(cert)} is not valid before {nb.isoformat()} (now "
            f"{now.isoformat()}; check the clocks)"
        )
    if now > na:
        raise CertExpired(f"{what} {_describe(cert)} expired at {na.isoformat()}")


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        # ValueError: issuer name mismatch; TypeError: unsupported key/algorithm.
        return False
    return True


def _build_path(chain: Sequence[x509.Certificate], bundle: TrustBundle) -> list[x509.Certificate]:
    """Return leaf..root: each cert signed by the next, ending at a root of the bundle."""
    path = [chain[0]]
    rest = list(chain[1:])
    current = chain[0]
    while True:
        for root in bundle.issuers_named(current.issuer):
            if _signed_by(current, root):
                path.append(root)
                return path
        nxt = next((c for c in rest if c.subject == current.issuer), None)
        if nxt is None or nxt in path:
            if current.issuer == current.subject:
                raise UnknownIssuer(
                    f"certificate {_describe(current)} is self-signed and not a root of the "
                    f"{bundle.trust_domain!r} trust bundle"
                )
            raise UnknownIssuer(
                f"certificate {_describe(current)} was issued by "
                f"{current.issuer.rfc4514_string()!r}, which does not chain to the "
                f"{bundle.trust_domain!r} trust bundle"
            )
        if not _signed_by(current, nxt):
            raise UnknownIssuer(
                f"certificate {_describe(current)} has a signature that does not verify "
                f"with its issuer {nxt.subject.rfc4514_string()!r} (forged or corrupted)"
            )
        if not is_ca_certificate(nxt):
            raise BadChain(f"intermediate {nxt.subject.rfc4514_string()!r} is not a CA certificate")
        path.append(nxt)
        rest.remove(nxt)
        current = nxt
        if len(path) > MAX_CHAIN_DEPTH:
            raise BadChain(f"certificate chain is longer than {MAX_CHAIN_DEPTH}")


def _check_path_lengths(path: Sequence[x509.Certificate]) -> None:
    # path = leaf, intermediates..., root. A CA at index i has i-1 CAs below it.
    for i, cert in enumerate(path[1:], start=1):
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            continue
        below = i - 1
        if bc.path_length is not None and below > bc.path_length:
            raise BadChain(
                f"CA {cert.subject.rfc4514_string()!r} allows {bc.path_length} intermediate(s) "
                f"below it, the chain has {below}"
            )


def verify_svid(
    chain: Sequence[x509.Certificate],
    bundle: TrustBundle,
    *,
    expected: SpiffeId | None = None,
    now: datetime | None = None,
) -> SpiffeId:
    """Verify ``chain`` (leaf first, intermediates after, root optional) and return its ID.

    Raises a ``CertificateRefused`` subclass naming the reason.
    """
    if not chain:
        raise NotAnSvid("peer presented no certificate")
    if now is None:
        now = datetime.now(UTC)
    ident = spiffe_id_of(chain[0])
    _check_trust_domain(ident, bundle.trust_domain)
    path = _build_path(chain, bundle)
    _check_path_lengths(path)
    for i, cert in enumerate(path):
        _check_dates(cert, now, "certificate" if i == 0 else "issuer")
    _check_expected(ident, expected)
    return ident


def check_peer_leaf(
    der: bytes | None,
    *,
    trust_domain: str,
    expected: SpiffeId | None = None,
    now: datetime | None = None,
) -> SpiffeId:
    """After a verified TLS handshake: the peer's SPIFFE ID, checked against expectations.

    ``der`` is ``getpeercert(binary_form=True)``. The dates are checked again (cheap) so a
    context built with a clock-skew allowance still refuses an expired peer with a clear reason.
    """
    if der is None:
        raise NotAnSvid("peer presented no certificate (is the listener in STRICT mode?)")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise NotAnSvid(f"peer certificate does not parse: {exc}") from None
    ident = spiffe_id_of(cert)
    _check_trust_domain(ident, trust_domain)
    _check_dates(cert, now if now is not None else datetime.now(UTC), "certificate")
    _check_expected(ident, expected)
    return ident
