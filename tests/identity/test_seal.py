"""CA key sealing: a standby CA opens the blob with the operator secret, nobody else can."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from pki_helpers import issue

from mesh import pki, pki_seal
from mesh.spiffe import SpiffeId

SECRET = "correct horse battery staple"


def test_sealed_ca_round_trips_and_signs(ca: pki.CertificateAuthority, checkout: SpiffeId) -> None:
    blob = pki.seal_ca(ca, SECRET)
    # The key never appears in clear in the blob (PKCS#8 DER of the key is not in it).
    assert ca.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()) not in blob
    standby = pki.unseal_ca(blob, SECRET)
    assert standby.certificate == ca.certificate and standby.bundle == ca.bundle
    svid = issue(standby, checkout)
    assert pki.verify_svid(svid.issued.chain, ca.bundle, expected=checkout) == checkout


def test_wrong_secret_fails(ca: pki.CertificateAuthority) -> None:
    blob = pki.seal_ca(ca, SECRET)
    with pytest.raises(pki.SealError, match="wrong operator secret") as info:
        pki.unseal_ca(blob, SECRET + "!")
    assert info.value.reason == "unseal-failed"


def test_altered_blob_fails(ca: pki.CertificateAuthority) -> None:
    blob = bytearray(pki.seal_ca(ca, SECRET))
    blob[-5] ^= 0xFF  # in the ciphertext
    with pytest.raises(pki.SealError, match="altered"):
        pki.unseal_ca(bytes(blob), SECRET)
    # Pairing our sealed key with another CA's public part (certificate) breaks the binding.
    other = pki.generate_root(ca.trust_domain)
    mine, theirs = pki.seal_ca(ca, SECRET), pki.seal_ca(other, SECRET)
    magic = b"TMCA1"
    _, sealed_mine = pki_seal._unpack(mine[len(magic) :], 2)
    public_theirs, _ = pki_seal._unpack(theirs[len(magic) :], 2)
    with pytest.raises(pki.SealError, match="wrong operator secret, or the blob was altered"):
        pki.unseal_ca(magic + pki_seal._pack(public_theirs, sealed_mine), SECRET)
    with pytest.raises(pki.SealError, match="bad header"):
        pki.unseal_ca(b"nonsense", SECRET)


def test_generic_seal_context_and_short_secret() -> None:
    blob = pki.seal(b"payload", SECRET, context=b"td=example.org")
    assert pki.unseal(blob, SECRET, context=b"td=example.org") == b"payload"
    with pytest.raises(pki.SealError):
        pki.unseal(blob, SECRET, context=b"td=other.org")
    with pytest.raises(pki.SealError, match="at least 16"):
        pki.seal(b"x", "short")
