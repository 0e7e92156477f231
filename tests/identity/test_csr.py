"""The CA's CSR checks and renewal proofs, with real keys and signatures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from pki_helpers import NOW, issue

from mesh import pki
from mesh.spiffe import SpiffeId


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *names: x509.GeneralName) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_good_csr_der_and_pem(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    key = pki.generate_key()
    der = pki.build_csr(key, checkout)
    assert pki.check_csr(der, checkout).public_key() == key.public_key()
    pem = x509.load_der_x509_csr(der).public_bytes(Encoding.PEM)
    assert ca.sign_csr(pem, checkout).identity == checkout


def test_csr_for_foreign_identity_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    # The credential allows checkout; the CSR asks for inventory.
    csr = pki.build_csr(pki.generate_key(), inventory)
    with pytest.raises(pki.CsrWrongIdentity) as info:
        ca.sign_csr(csr, checkout)
    assert inventory.uri in str(info.value) and checkout.uri in str(info.value)
    assert info.value.reason == "csr-wrong-identity"


def test_bad_csr_signature_refused(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    der = bytearray(pki.build_csr(pki.generate_key(), checkout))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    with pytest.raises(pki.CsrBadSignature, match="does not verify"):
        ca.sign_csr(bytes(der), checkout)


def test_csr_signed_by_another_key_refused(
    ca: pki.CertificateAuthority, checkout: SpiffeId
) -> None:
    # Same public key info, signature made by a different key: splice the two.
    victim = x509.load_der_x509_csr(pki.build_csr(pki.generate_key(), checkout))
    attacker = x509.load_der_x509_csr(pki.build_csr(pki.generate_key(), checkout))
    forged = victim.tbs_certrequest_bytes
    der = attacker.public_bytes(Encoding.DER)
    spliced = der.replace(attacker.tbs_certrequest_bytes, forged)
    assert spliced != der
    with pytest.raises(pki.CsrBadSignature):
        ca.sign_csr(spliced, checkout)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP256K1()])
def test_key_curve_not_allowed(
    ca: pki.CertificateAuthority, checkout: SpiffeId, curve: ec.EllipticCurve
) -> None:
    key = ec.generate_private_key(curve)
    csr = _csr(key, x509.UniformResourceIdentifier(checkout.uri))
    with pytest.raises(pki.CsrKeyNotAllowed, match=curve.name):
        ca.sign_csr(csr, checkout)


def test_rsa_key_not_allowed(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(pki.CsrKeyNotAllowed, match="RSA"):
        ca.sign_csr(_csr(key, x509.UniformResourceIdentifier(checkout.uri)), checkout)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ((), "no SubjectAlternativeName"),
        ((x509.DNSName("checkout.shop"),), "1 SAN entries (0 URI)"),
        (
            (x509.UniformResourceIdentifier("spiffe://example.org/ns/shop/sa/admin"),),
            "2 SAN entries (2 URI)",
        ),
        ((x509.DNSName("evil.example"),), "2 SAN entries (1 URI)"),
    ],
)
def test_san_must_be_exactly_the_identity(
    ca: pki.CertificateAuthority,
    checkout: SpiffeId,
    extra: tuple[x509.GeneralName, ...],
    needle: str,
) -> None:
    key = pki.generate_key()
    if extra and needle.startswith("1 SAN"):
        names: tuple[x509.GeneralName, ...] = extra
    elif extra:
        names = (x509.UniformResourceIdentifier(checkout.uri), *extra)
    else:
        names = ()
    with pytest.raises(pki.CsrMalformed, match=needle.replace("(", r"\(").replace(")", r"\)")):
        ca.sign_csr(_csr(key, *names), checkout)


def test_garbage_csr(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    with pytest.raises(pki.CsrMalformed, match="does not parse"):
        ca.sign_csr(b"\x30\x03junk", checkout)
    with pytest.raises(pki.CsrMalformed, match="more than"):
        ca.sign_csr(b"\x00" * 100_000, checkout)


def test_renewal_proof(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    current = issue(ca, checkout)
    new_csr = pki.build_csr(pki.generate_key(), checkout)
    proof = pki.renewal_proof(current, new_csr)
    pki.verify_renewal(current.issued.chain, proof, new_csr, ca.bundle, checkout)
    # Proof made by some other key.
    other = issue(ca, checkout)
    with pytest.raises(pki.RenewalProofInvalid):
        pki.verify_renewal(
            current.issued.chain, pki.renewal_proof(other, new_csr), new_csr, ca.bundle, checkout
        )
    # Proof over another CSR.
    with pytest.raises(pki.RenewalProofInvalid):
        pki.verify_renewal(
            current.issued.chain,
            proof,
            pki.build_csr(pki.generate_key(), checkout),
            ca.bundle,
            checkout,
        )


def test_renewal_needs_a_valid_current_svid(
    ca: pki.CertificateAuthority, checkout: SpiffeId, inventory: SpiffeId
) -> None:
    expired = issue(ca, checkout, ttl=timedelta(hours=1), now=NOW - timedelta(days=2))
    csr = pki.build_csr(pki.generate_key(), checkout)
    with pytest.raises(pki.CertExpired):
        pki.verify_renewal(
            expired.issued.chain, pki.renewal_proof(expired, csr), csr, ca.bundle, checkout
        )
    # A valid SVID of inventory cannot renew into checkout.
    inv = issue(ca, inventory)
    with pytest.raises(pki.WrongIdentity):
        pki.verify_renewal(
            inv.issued.chain,
            pki.renewal_proof(inv, csr),
            csr,
            ca.bundle,
            checkout,
            now=datetime.now(UTC),
        )
