"""What the CA signs: every leaf a valid SPIFFE X509-SVID; loading operator CAs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from pki_helpers import issue

from mesh import pki
from mesh.spiffe import SpiffeId


def test_leaf_is_a_spiffe_svid(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    now = datetime.now(UTC)
    svid = issue(ca, checkout, now=now)
    leaf = svid.issued.certificate
    assert svid.issued.chain == (leaf,)  # CA is the root: nothing to append
    exts = leaf.extensions
    san = exts.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty
    assert list(san.value) == [x509.UniformResourceIdentifier(checkout.uri)]
    assert leaf.subject == x509.Name([])
    bc = exts.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = exts.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)
    eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == (
        pki.DEFAULT_LEAF_TTL + pki.CLOCK_SKEW
    )
    leaf.verify_directly_issued_by(ca.certificate)
    assert pki.verify_svid(svid.issued.chain, ca.bundle, expected=checkout) == checkout


def test_serials_are_random_and_distinct(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    key = pki.generate_key()
    csr = pki.build_csr(key, checkout)
    serials = {ca.sign_csr(csr, checkout).serial for _ in range(50)}
    assert len(serials) == 50
    assert all(s.bit_length() > 64 for s in serials)


def test_ttl_down_to_minutes_and_floor(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    now = datetime.now(UTC)
    svid = issue(ca, checkout, ttl=timedelta(minutes=1), now=now)
    assert svid.not_after == (now + timedelta(minutes=1)).replace(microsecond=0)
    with pytest.raises(pki.CaLoadError, match="below the minimum"):
        issue(ca, checkout, ttl=timedelta(seconds=10))


def test_leaf_never_outlives_its_ca(checkout: SpiffeId) -> None:
    short = pki.generate_root(checkout.trust_domain, ttl=timedelta(hours=2))
    svid = issue(short, checkout, ttl=timedelta(hours=24))
    assert svid.not_after <= short.not_after


def test_intermediate_chain_is_returned(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    inter = pki.generate_intermediate(ca)
    svid = issue(inter, checkout)
    assert svid.issued.chain[1:] == (inter.certificate,)
    assert inter.bundle == ca.bundle
    assert pki.verify_svid(svid.issued.chain, ca.bundle) == checkout
    # Without the intermediate a peer cannot chain the leaf to the root.
    with pytest.raises(pki.UnknownIssuer):
        pki.verify_svid(svid.issued.chain[:1], ca.bundle)


def test_chain_wire_round_trip(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    inter = pki.generate_intermediate(ca)
    issued = issue(inter, checkout).issued
    assert pki.IssuedSvid.from_der(issued.chain_der) == issued
    assert pki.IssuedSvid.from_pem(issued.chain_pem) == issued
    with pytest.raises(pki.NotAnSvid, match="does not parse"):
        pki.IssuedSvid.from_der([b"junk"])


def test_svid_key_must_match(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    svid = issue(ca, checkout)
    with pytest.raises(pki.NotAnSvid, match="does not match"):
        pki.Svid(svid.issued, pki.generate_key())
    assert "key=" not in repr(svid)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certs)


def test_load_operator_root(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey)
    key_pem = ca.key.private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"hunter2hunter2")
    )
    loaded = pki.load_ca(ca.trust_domain, _pem(ca.certificate), key_pem, password=b"hunter2hunter2")
    svid = issue(loaded, checkout)
    assert pki.verify_svid(svid.issued.chain, ca.bundle, expected=checkout) == checkout
    with pytest.raises(pki.CaLoadError, match="wrong password"):
        pki.load_ca(ca.trust_domain, _pem(ca.certificate), key_pem, password=b"nope")


def test_load_operator_intermediate(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    inter = pki.generate_intermediate(ca)
    assert isinstance(inter.key, ec.EllipticCurvePrivateKey)
    key_pem = inter.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    # Root appended to the certificate file.
    loaded = pki.load_ca(ca.trust_domain, _pem(inter.certificate, ca.certificate), key_pem)
    assert loaded.bundle == ca.bundle
    assert pki.verify_svid(issue(loaded, checkout).issued.chain, ca.bundle) == checkout
    # Root given as a separate bundle file.
    loaded2 = pki.load_ca(
        ca.trust_domain, _pem(inter.certificate), key_pem, bundle_pem=ca.bundle.to_pem()
    )
    assert loaded2.bundle == ca.bundle
    with pytest.raises(pki.CaLoadError, match="intermediate but no root"):
        pki.load_ca(ca.trust_domain, _pem(inter.certificate), key_pem)
    with pytest.raises(pki.CaLoadError, match="out of order"):
        pki.load_ca(ca.trust_domain, _pem(ca.certificate, inter.certificate), key_pem)
    stranger = pki.generate_root(ca.trust_domain)
    with pytest.raises(pki.CaLoadError, match="not a root of the trust bundle"):
        pki.load_ca(
            ca.trust_domain, _pem(inter.certificate), key_pem, bundle_pem=stranger.bundle.pem
        )


def test_load_refuses_mismatched_key_and_non_ca(
    ca: pki.CertificateAuthority, checkout: SpiffeId
) -> None:
    other_key = pki.generate_key()
    key_pem = other_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(pki.CaLoadError, match="does not match"):
        pki.load_ca(ca.trust_domain, _pem(ca.certificate), key_pem)
    leaf = issue(ca, checkout)
    with pytest.raises(pki.CaLoadError, match="not a CA"):
        pki.load_ca(ca.trust_domain, leaf.issued.chain_pem, leaf.key_pem())
    with pytest.raises(pki.CaLoadError, match="not PEM"):
        pki.load_ca(ca.trust_domain, b"garbage", key_pem)


def test_identity_outside_trust_domain_refused(ca: pki.CertificateAuthority) -> None:
    foreign = SpiffeId("other.org", "shop", "checkout")
    key = pki.generate_key()
    with pytest.raises(pki.CsrWrongIdentity, match="outside this CA's trust domain"):
        ca.sign_csr(pki.build_csr(key, foreign), foreign)
