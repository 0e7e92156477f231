"""Seal the CA signing key under an operator secret, so a standby CA can load it from KV.

Format (all integers big-endian)::

    b"TMSEAL1" | log2(N) u8 | r u8 | p u8 | salt 16 | nonce 12 | AES-256-GCM(ciphertext+tag)

The key is scrypt(secret, salt, N, r, p) -> 32 bytes: memory-hard, so guessing a weak operator
secret offline from a stolen KV entry costs ~100 ms and 32 MiB per guess. The header and a
caller ``context`` (e.g. the trust domain and CA certificate) are authenticated as associated
data, so a blob cannot be moved to another trust domain or paired with another certificate.

``seal_ca``/``unseal_ca`` pack a whole CA: the certificate chain and roots in clear (they are
public) and the PKCS#8 DER key sealed, the clear part bound into the context. The standby gets
the operator secret from its own environment/secret store, never from the bus; the bus and KV
only ever see the sealed blob.
"""

from __future__ import annotations

import os
import struct

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_der_private_key,
)

from mesh.pki_ca import CertificateAuthority
from mesh.pki_csr import ALLOWED_CURVES
from mesh.pki_errors import CaLoadError, SealError

__all__ = ["MIN_SECRET_BYTES", "seal", "seal_ca", "unseal", "unseal_ca"]

MIN_SECRET_BYTES = 16
_MAGIC = b"TMSEAL1"
_CA_MAGIC = b"TMCA1"
_HEADER = struct.Struct("!7sBBB16s12s")
_DEFAULT_LOG_N, _R, _P = 15, 8, 1  # 2**15 * 8 * 128 B = 32 MiB, ~0.1 s
_MAX_LOG_N = 20  # refuse headers that would make us allocate absurd memory


def _secret_bytes(secret: bytes | str) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    if len(raw) < MIN_SECRET_BYTES:
        raise SealError(
            f"operator secret is {len(raw)} bytes; at least {MIN_SECRET_BYTES} are required"
        )
    return raw


def _derive(secret: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=2**log_n, r=r, p=p).derive(secret)


def seal(plaintext: bytes, secret: bytes | str, *, context: bytes = b"") -> bytes:
    """Encrypt ``plaintext`` under ``secret``; ``context`` must be given again to unseal."""
    raw = _secret_bytes(secret)
    salt, nonce = os.urandom(16), os.urandom(12)
    header = _HEADER.pack(_MAGIC, _DEFAULT_LOG_N, _R, _P, salt, nonce)
    key = _derive(raw, salt, _DEFAULT_LOG_N, _R, _P)
    return header + AESGCM(key).encrypt(nonce, plaintext, header + context)


def unseal(blob: bytes, secret: bytes | str, *, context: bytes = b"") -> bytes:
    """Decrypt a ``seal`` blob. ``SealError`` if the secret or context is wrong or it was altered."""
    raw = _secret_bytes(secret)
    if len(blob) < _HEADER.size + 16 or not blob.startswith(_MAGIC):
        raise SealError("not a sealed blob (bad header or truncated)")
    _magic, log_n, r, p, salt, nonce = _HEADER.unpack_from(blob)
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise SealError(f"sealed blob has unsupported scrypt parameters N=2^{log_n} r={r} p={p}")
    header = blob[: _HEADER.size]
    key = _derive(raw, salt, log_n, r, p)
    try:
        return AESGCM(key).decrypt(nonce, blob[_HEADER.size :], header + context)
    except InvalidTag:
        raise SealError(
            "sealed blob does not open: wrong operator secret, or the blob was altered"
        ) from None


def _pack(*parts: bytes) -> bytes:
    return b"".join(struct.pack("!I", len(p)) + p for p in parts)


def _unpack(data: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise SealError("sealed CA blob is truncated")
        (n,) = struct.unpack_from("!I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise SealError("sealed CA blob is truncated")
        out.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise SealError("sealed CA blob has trailing bytes")
    return out


def _ca_context(public: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(public)
    return b"trio-mesh CA key\x00" + digest.finalize()


def seal_ca(ca: CertificateAuthority, secret: bytes | str) -> bytes:
    """One blob for KV: CA chain + roots in clear, the signing key sealed and bound to them."""
    roots = b"".join(c.public_bytes(Encoding.PEM) for c in ca.bundle.roots)
    public = _pack(ca.trust_domain.encode(), ca.chain_pem(), roots)
    key_der = ca.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return _CA_MAGIC + _pack(public, seal(key_der, secret, context=_ca_context(public)))


def unseal_ca(
    blob: bytes, secret: bytes | str, *, allowed_curves: frozenset[str] = ALLOWED_CURVES
) -> CertificateAuthority:
    """The standby's side of ``seal_ca``. ``SealError`` on a wrong secret or altered blob."""
    if not blob.startswith(_CA_MAGIC):
        raise SealError("not a sealed CA blob (bad header)")
    public, sealed = _unpack(blob[len(_CA_MAGIC) :], 2)
    td, chain_pem, roots_pem = _unpack(public, 3)
    key_der = unseal(sealed, secret, context=_ca_context(public))
    try:
        key = load_der_private_key(key_der, None)
        certs = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(roots_pem)
    except ValueError as exc:
        raise SealError(f"sealed CA blob opened but its content does not parse: {exc}") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise CaLoadError(f"sealed CA key type {type(key).__name__} is not supported")
    return CertificateAuthority(
        td.decode(),
        key,
        certs[0],
        intermediates=certs[1:],
        roots=roots,
        allowed_curves=allowed_curves,
    )
