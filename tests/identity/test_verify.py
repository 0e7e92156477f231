"""Peer chain verification: each refusal reason, with real forged/expired/foreign certs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from pki_helpers import NOW, forge_self_signed, issue

from mesh import pki
from mesh.errors import MeshError
from mesh.spiffe import SpiffeId


def test_forged_self_signed_copy_refused(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    forged = forge_self_signed(checkout)
    with pytest.raises(pki.UnknownIssuer, match="self-signed") as info:
        pki.verify_svid(forged.issued.chain, ca.bundle, expected=checkout)
    assert info.value.reason == "unknown-issuer"
    assert isinstance(info.value, MeshError)


def test_forged_with_real_issuer_name_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId
) -> None:
    forged = forge_self_signed(checkout, issuer=ca.certificate.subject)
    with pytest.raises(pki.UnknownIssuer, match="does not chain"):
        pki.verify_svid(forged.issued.chain, ca.bundle, expected=checkout)


def test_expired_refused(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    svid = issue(ca, checkout, ttl=timedelta(hours=1), now=NOW - timedelta(days=2))
    with pytest.raises(pki.CertExpired, match="expired at") as info:
        pki.verify_svid(svid.issued.chain, ca.bundle)
    assert info.value.reason == "expired"


def test_not_yet_valid_refused(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    svid = issue(ca, checkout, now=datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(pki.CertNotYetValid, match="not valid before"):
        pki.verify_svid(svid.issued.chain, ca.bundle)


def test_wrong_trust_domain_refused(
    ca: pki.CertificateAuthority, other_ca: pki.CertificateAuthority
) -> None:
    foreign = SpiffeId("other.org", "shop", "checkout")
    svid = issue(other_ca, foreign)
    with pytest.raises(pki.WrongTrustDomain, match=r"'other\.org'"):
        pki.verify_svid(svid.issued.chain, ca.bundle)


def test_wrong_identity_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    svid = issue(ca, inventory)
    assert pki.verify_svid(svid.issued.chain, ca.bundle) == inventory
    with pytest.raises(
        pki.WrongIdentity, match=r"expected spiffe://example\.org/ns/shop/sa/checkout"
    ):
        pki.verify_svid(svid.issued.chain, ca.bundle, expected=checkout)


def test_ca_certificate_is_not_an_svid(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(pki.NotAnSvid):
        pki.verify_svid([ca.certificate], ca.bundle)
    with pytest.raises(pki.NotAnSvid, match="no certificate"):
        pki.verify_svid([], ca.bundle)


def test_bundle_with_two_roots_accepts_both(checkout: SpiffeId) -> None:
    old = pki.generate_root(checkout.trust_domain)
    new = pki.generate_root(checkout.trust_domain)
    overlap = old.bundle.with_root(new.certificate)
    assert len(overlap) == 2
    a, b = issue(old, checkout), issue(new, checkout)
    assert pki.verify_svid(a.issued.chain, overlap) == checkout
    assert pki.verify_svid(b.issued.chain, overlap) == checkout
    # Before the overlap, the new root's leaves are unknown; after retiring, the old ones.
    with pytest.raises(pki.UnknownIssuer):
        pki.verify_svid(b.issued.chain, old.bundle)
    retired = overlap.without_root(old.certificate)
    with pytest.raises(pki.UnknownIssuer):
        pki.verify_svid(a.issued.chain, retired)
    assert pki.verify_svid(b.issued.chain, retired) == checkout
    with pytest.raises(pki.CaLoadError, match="not in the trust bundle"):
        retired.without_root(old.certificate)


def test_bundle_pem_round_trip(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    other = pki.generate_root(checkout.trust_domain)
    bundle = ca.bundle.with_root(other.certificate)
    again = pki.TrustBundle.from_pem(checkout.trust_domain, bundle.to_pem())
    assert again == bundle and again.fingerprints() == bundle.fingerprints()
    assert other.certificate in again
    with pytest.raises(pki.CaLoadError, match="not a CA"):
        pki.TrustBundle(checkout.trust_domain, [issue(ca, checkout).issued.certificate])
    with pytest.raises(pki.CaLoadError, match="no root"):
        pki.TrustBundle(checkout.trust_domain, [])
    with pytest.raises(pki.CaLoadError, match="not valid PEM"):
        pki.TrustBundle.from_pem(checkout.trust_domain, b"")


def test_check_peer_leaf(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    der = issue(ca, checkout).issued.certificate.public_bytes(Encoding.DER)
    td = checkout.trust_domain
    assert pki.check_peer_leaf(der, trust_domain=td, expected=checkout) == checkout
    with pytest.raises(pki.WrongIdentity):
        pki.check_peer_leaf(der, trust_domain=td, expected=inventory)
    with pytest.raises(pki.WrongTrustDomain):
        pki.check_peer_leaf(der, trust_domain="other.org")
    with pytest.raises(pki.NotAnSvid, match="no certificate"):
        pki.check_peer_leaf(None, trust_domain=td)


def test_leaf_without_uri_san_is_not_an_svid(ca: pki.CertificateAuthority) -> None:
    key = pki.generate_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("a.b")]), critical=True)
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(pki.NotAnSvid, match="0 URI SANs"):
        pki.verify_svid([cert], ca.bundle)


def test_refusal_round_trips_by_reason() -> None:
    err = pki.refusal_from_reason("expired", "leaf expired")
    assert isinstance(err, pki.CertExpired) and str(err) == "leaf expired"
    assert type(pki.refusal_from_reason("csr-wrong-identity", "x")) is pki.CsrWrongIdentity
    assert type(pki.refusal_from_reason("token-replayed", "x")).__name__ == "TokenReplayed"
    assert type(pki.refusal_from_reason("from-the-future", "x")) is pki.IdentityError
