"""Signed trust-bundle announcements (mesh/pki_announce.py): who may change what agents trust."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from mesh import pki
from mesh.messages import BundleAnnounce, decode_as, encode
from mesh.pki_announce import BundleRejected, sign_announcement, verify_announcement

TD = "example.org"


def unsigned(ca: pki.CertificateAuthority, issued_at: float = 10.0) -> BundleAnnounce:
    return BundleAnnounce(
        trust_domain=ca.trust_domain,
        roots_pem=ca.bundle.pem,
        signing_ca=ca.certificate.public_bytes(Encoding.DER),
        issued_at=issued_at,
        intermediates=[c.public_bytes(Encoding.DER) for c in ca.intermediates],
    )


def signed(ca: pki.CertificateAuthority, issued_at: float = 10.0) -> BundleAnnounce:
    return sign_announcement(unsigned(ca, issued_at), [(ca.certificate, ca.key)])


def test_a_bundle_signed_by_the_trusted_root_is_accepted_and_survives_the_wire() -> None:
    ca = pki.generate_root(TD)
    msg = decode_as(encode(signed(ca)), BundleAnnounce)
    assert verify_announcement(msg, ca.bundle) == ca.bundle


def test_unsigned_forged_tampered_foreign_and_stale_announcements_are_refused() -> None:
    ca = pki.generate_root(TD)
    with pytest.raises(BundleRejected, match="not signed"):
        verify_announcement(unsigned(ca), ca.bundle)
    attacker = pki.generate_root(TD)
    with pytest.raises(BundleRejected, match="not signed by a trusted root"):
        verify_announcement(signed(attacker), ca.bundle)
    # The attacker copies the genuine signer certificate but must sign with its own key.
    forged = dataclasses.replace(
        signed(attacker), signers=[ca.certificate.public_bytes(Encoding.DER)]
    )
    with pytest.raises(BundleRejected, match="not signed by a trusted root"):
        verify_announcement(forged, ca.bundle)
    # A genuine signature does not cover other roots.
    tampered = dataclasses.replace(signed(ca), roots_pem=ca.bundle.pem + attacker.bundle.pem)
    with pytest.raises(BundleRejected, match="not signed by a trusted root"):
        verify_announcement(tampered, ca.bundle)
    with pytest.raises(BundleRejected, match="trust domain"):
        verify_announcement(signed(pki.generate_root("other.org")), ca.bundle)
    with pytest.raises(BundleRejected, match="a replay"):
        verify_announcement(signed(ca, issued_at=5.0), ca.bundle, last_issued_at=6.0)


def test_a_leaf_cannot_sign_announcements() -> None:
    ca = pki.generate_root(TD)
    key = pki.generate_key()
    leaf = ca.issue(pki.SpiffeId(TD, "shop", "checkout"), key.public_key())
    msg = sign_announcement(unsigned(ca), [(leaf.certificate, key)])
    with pytest.raises(BundleRejected):
        verify_announcement(msg, ca.bundle)


def test_rotation_overlap_is_signed_by_both_roots_then_the_new_root_retires_the_old() -> None:
    old = pki.generate_root(TD)
    new_root = pki.generate_root(TD)
    overlap_ca = new_root.with_roots(old.bundle.with_root(new_root.certificate).roots)
    overlap = sign_announcement(
        unsigned(overlap_ca, 20.0),
        [(old.certificate, old.key), (new_root.certificate, new_root.key)],
    )
    trusted = verify_announcement(overlap, old.bundle, last_issued_at=10.0)
    assert len(trusted) == 2
    retired_ca = new_root.with_roots([new_root.certificate])
    retire = signed(retired_ca, 30.0)
    # An agent that missed the overlap cannot take the new root's word alone...
    with pytest.raises(BundleRejected):
        verify_announcement(retire, old.bundle, last_issued_at=10.0)
    # ...one that has it can; and the overlap replayed afterwards is refused.
    after = verify_announcement(retire, trusted, last_issued_at=20.0)
    assert after.fingerprints() == [pki.fingerprint(new_root.certificate)]
    with pytest.raises(BundleRejected, match="replay"):
        verify_announcement(overlap, after, last_issued_at=30.0)


def test_an_operator_intermediate_signs_through_its_chain() -> None:
    root = pki.generate_root(TD)
    inter = pki.generate_intermediate(pki.generate_intermediate(root))
    assert len(inter.intermediates) == 1  # signer -> intermediate -> root
    assert verify_announcement(signed(inter), root.bundle) == inter.bundle
    # Without the chain the signer cannot be tied to the root.
    no_chain = dataclasses.replace(unsigned(inter), intermediates=[])
    msg = sign_announcement(no_chain, [(inter.certificate, inter.key)])
    with pytest.raises(BundleRejected, match="not signed by a trusted root"):
        verify_announcement(msg, root.bundle)
