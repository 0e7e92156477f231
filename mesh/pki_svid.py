"""X509-SVID values: what the CA returns (``IssuedSvid``) and what a sidecar holds (``Svid``).

``IssuedSvid`` is public material (certificates only) and is what travels on the bus, as a
list of DER blobs. ``Svid`` adds the private key, which is created in the sidecar's memory
and never serialized except into an ``ssl.SSLContext`` (see ``mesh.pki_tls``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from mesh.pki_errors import NotAnSvid
from mesh.pki_verify import spiffe_id_of
from mesh.spiffe import SpiffeId

__all__ = ["IssuedSvid", "Svid"]


@dataclass(frozen=True)
class IssuedSvid:
    """A signed leaf plus the intermediates needed to reach a root (root excluded).

    ``chain[0]`` is the leaf. Build from the wire with ``from_der``/``from_pem``.
    """

    identity: SpiffeId
    chain: tuple[x509.Certificate, ...]

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number

    @property
    def serial_hex(self) -> str:
        return f"{self.chain[0].serial_number:x}"

    @property
    def not_before(self) -> datetime:
        return self.chain[0].not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.chain[0].not_valid_after_utc

    def seconds_to_expiry(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds()

    @cached_property
    def chain_der(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(Encoding.DER) for c in self.chain)

    @cached_property
    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(Encoding.PEM) for c in self.chain)

    @classmethod
    def from_chain(cls, chain: Sequence[x509.Certificate]) -> IssuedSvid:
        if not chain:
            raise NotAnSvid("certificate chain is empty")
        return cls(spiffe_id_of(chain[0]), tuple(chain))

    @classmethod
    def from_der(cls, ders: Sequence[bytes]) -> IssuedSvid:
        try:
            chain = [x509.load_der_x509_certificate(d) for d in ders]
        except ValueError as exc:
            raise NotAnSvid(f"certificate chain does not parse as DER: {exc}") from None
        return cls.from_chain(chain)

    @classmethod
    def from_pem(cls, pem: bytes) -> IssuedSvid:
        try:
            chain = x509.load_pem_x509_certificates(pem)
        except ValueError as exc:
            raise NotAnSvid(f"certificate chain does not parse as PEM: {exc}") from None
        return cls.from_chain(chain)


@dataclass(frozen=True)
class Svid:
    """A workload's credential: issued chain + the matching private key (memory only).

    ``repr`` never shows the key. The key is checked against the leaf on construction so a
    mix-up surfaces here and not as an opaque TLS error.
    """

    issued: IssuedSvid
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        mine = self.key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        theirs = self.issued.certificate.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        if mine != theirs:
            raise NotAnSvid(f"private key does not match the certificate of {self.issued.identity}")

    @property
    def identity(self) -> SpiffeId:
        return self.issued.identity

    @property
    def not_after(self) -> datetime:
        return self.issued.not_after

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM. Only ``mesh.pki_tls`` should need this (to feed OpenSSL)."""
        return self.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
