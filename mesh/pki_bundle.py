"""Trust bundle: the set of root certificates a trust domain's workloads accept.

More than one root is normal: during ``mesh ca rotate`` the old and the new root are both in
the bundle (the overlap), so leaves of either verify until the old root is retired.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.pki_errors import CaLoadError
from mesh.spiffe import validate_trust_domain

__all__ = ["TrustBundle", "fingerprint", "is_ca_certificate"]

_SHA256 = hashes.SHA256()


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, lowercase hex: how roots are named in logs and the CLI."""
    return cert.fingerprint(_SHA256).hex()


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """True if BasicConstraints says CA=true (and KeyUsage, if present, allows keyCertSign)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


class TrustBundle:
    """An immutable set of roots for one trust domain. ``with_root``/``without_root`` copy."""

    __slots__ = ("__dict__", "_by_subject", "_roots", "trust_domain")

    def __init__(self, trust_domain: str, roots: Iterable[x509.Certificate]) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        unique: dict[bytes, x509.Certificate] = {}
        for cert in roots:
            if not is_ca_certificate(cert):
                raise CaLoadError(
                    f"trust bundle root {cert.subject.rfc4514_string()!r} is not a CA "
                    "certificate (BasicConstraints CA=true and keyCertSign are required)"
                )
            unique.setdefault(cert.fingerprint(_SHA256), cert)
        if not unique:
            raise CaLoadError(f"trust bundle for {trust_domain!r} has no root certificate")
        self._roots: tuple[x509.Certificate, ...] = tuple(unique.values())
        by_subject: dict[x509.Name, list[x509.Certificate]] = {}
        for cert in self._roots:
            by_subject.setdefault(cert.subject, []).append(cert)
        # Chain verification looks issuers up by name; several roots may share one (rotation).
        self._by_subject = {k: tuple(v) for k, v in by_subject.items()}

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    def issuers_named(self, name: x509.Name) -> tuple[x509.Certificate, ...]:
        return self._by_subject.get(name, ())

    def __contains__(self, cert: object) -> bool:
        return isinstance(cert, x509.Certificate) and cert in self._roots

    def __iter__(self) -> Iterator[x509.Certificate]:
        return iter(self._roots)

    def __len__(self) -> int:
        return len(self._roots)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustBundle):
            return NotImplemented
        return self.trust_domain == other.trust_domain and set(self.fingerprints()) == set(
            other.fingerprints()
        )

    def __hash__(self) -> int:
        return hash((self.trust_domain, frozenset(self.fingerprints())))

    def __repr__(self) -> str:
        fps = ", ".join(fp[:16] for fp in self.fingerprints())
        return f"TrustBundle({self.trust_domain!r}, roots=[{fps}])"

    def fingerprints(self) -> list[str]:
        return [fingerprint(c) for c in self._roots]

    def with_root(self, cert: x509.Certificate) -> TrustBundle:
        """The overlap step of a rotation: trust ``cert`` as well."""
        return TrustBundle(self.trust_domain, (*self._roots, cert))

    def without_root(self, cert_or_fingerprint: x509.Certificate | str) -> TrustBundle:
        """The retire step of a rotation. Refuses to remove the last root."""
        fp = (
            cert_or_fingerprint
            if isinstance(cert_or_fingerprint, str)
            else fingerprint(cert_or_fingerprint)
        ).lower()
        kept = [c for c in self._roots if fingerprint(c) != fp]
        if len(kept) == len(self._roots):
            raise CaLoadError(f"root {fp[:16]}... is not in the trust bundle")
        return TrustBundle(self.trust_domain, kept)

    @cached_property
    def pem(self) -> bytes:
        """All roots as concatenated PEM (cached: every new TLS context loads it)."""
        return b"".join(c.public_bytes(Encoding.PEM) for c in self._roots)

    def to_pem(self) -> bytes:
        return self.pem

    @classmethod
    def from_pem(cls, trust_domain: str, data: bytes) -> TrustBundle:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise CaLoadError(f"trust bundle is not valid PEM certificates: {exc}") from exc
        return cls(trust_domain, certs)
