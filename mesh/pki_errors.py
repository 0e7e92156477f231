"""Typed refusals of the identity core (SPIFFE IDs, certificates, CSRs, tokens, sealed keys).

Every class carries ``reason``: a short stable flag for logs, metrics and the wire (a CA reply
can carry it so the sidecar re-raises the same class with ``refusal_from_reason``). The message
is for a human and names the problem and, where it helps, the offending value.
"""

from __future__ import annotations

from typing import ClassVar

from mesh.errors import ConfigError, IdentityError

__all__ = [
    "BadChain",
    "CaLoadError",
    "CertExpired",
    "CertNotYetValid",
    "CertificateRefused",
    "CsrBadSignature",
    "CsrKeyNotAllowed",
    "CsrMalformed",
    "CsrRefused",
    "CsrWrongIdentity",
    "IdentityError",
    "NotAnSvid",
    "RenewalProofInvalid",
    "SealError",
    "SpiffeIdError",
    "TokenExpired",
    "TokenMalformed",
    "TokenRefused",
    "TokenReplayed",
    "TokenRevoked",
    "TokenUnknown",
    "TokenWrongIdentity",
    "UnknownIssuer",
    "WrongIdentity",
    "WrongTrustDomain",
    "refusal_from_reason",
]


class SpiffeIdError(IdentityError):
    """A string is not a valid ``spiffe://<td>/ns/<ns>/sa/<sa>`` ID."""

    reason: ClassVar[str] = "bad-spiffe-id"


# --- peer certificates -------------------------------------------------------------------------


class CertificateRefused(IdentityError):
    """A peer's certificate chain was refused. Subclasses name why."""

    reason: ClassVar[str] = "cert-refused"


class CertExpired(CertificateRefused):
    reason: ClassVar[str] = "expired"


class CertNotYetValid(CertificateRefused):
    reason: ClassVar[str] = "not-yet-valid"


class UnknownIssuer(CertificateRefused):
    """Self-signed, forged, or signed by a CA that is not in the trust bundle."""

    reason: ClassVar[str] = "unknown-issuer"


class WrongTrustDomain(CertificateRefused):
    reason: ClassVar[str] = "wrong-trust-domain"


class NotAnSvid(CertificateRefused):
    """Not a SPIFFE X509-SVID leaf: no/several URI SANs, a CA cert, or signing key usages."""

    reason: ClassVar[str] = "not-svid"


class WrongIdentity(CertificateRefused):
    """A valid SVID, but of another workload than the one expected."""

    reason: ClassVar[str] = "wrong-identity"


class BadChain(CertificateRefused):
    """The chain is structurally wrong: an intermediate that is not a CA, or too long."""

    reason: ClassVar[str] = "bad-chain"


# --- CSRs ---------------------------------------------------------------------------------------


class CsrRefused(IdentityError):
    reason: ClassVar[str] = "csr-refused"


class CsrMalformed(CsrRefused):
    reason: ClassVar[str] = "csr-malformed"


class CsrBadSignature(CsrRefused):
    reason: ClassVar[str] = "csr-bad-signature"


class CsrWrongIdentity(CsrRefused):
    """The CSR asks for another identity than the one the credential allows."""

    reason: ClassVar[str] = "csr-wrong-identity"


class CsrKeyNotAllowed(CsrRefused):
    reason: ClassVar[str] = "csr-key-not-allowed"


class RenewalProofInvalid(CsrRefused):
    """A renewal was not signed by the key of a currently valid SVID of the same identity."""

    reason: ClassVar[str] = "renewal-proof-invalid"


# --- join tokens -------------------------------------------------------------------------------


class TokenRefused(IdentityError):
    reason: ClassVar[str] = "token-refused"


class TokenMalformed(TokenRefused):
    reason: ClassVar[str] = "token-malformed"


class TokenUnknown(TokenRefused):
    """No such token, or its secret part is wrong (the two are not told apart on purpose)."""

    reason: ClassVar[str] = "token-unknown"


class TokenExpired(TokenRefused):
    reason: ClassVar[str] = "token-expired"


class TokenWrongIdentity(TokenRefused):
    reason: ClassVar[str] = "token-wrong-identity"


class TokenReplayed(TokenRefused):
    """The token has been redeemed as many times as it allows."""

    reason: ClassVar[str] = "token-replayed"


class TokenRevoked(TokenRefused):
    reason: ClassVar[str] = "token-revoked"


# --- CA material --------------------------------------------------------------------------------


class SealError(IdentityError):
    """A sealed blob could not be opened: wrong operator secret, altered, or not a sealed blob."""

    reason: ClassVar[str] = "unseal-failed"


class CaLoadError(IdentityError, ConfigError):
    """Operator-supplied CA files are unusable (not a CA, key does not match, bad PEM...)."""

    reason: ClassVar[str] = "ca-invalid"


def _all_subclasses(cls: type[IdentityError]) -> list[type[IdentityError]]:
    out: list[type[IdentityError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_REASON: dict[str, type[IdentityError]] = {}


def refusal_from_reason(reason: str, message: str) -> IdentityError:
    """Rebuild the typed error a remote CA refused with (its reply carries reason + message).

    Unknown reasons (a newer CA) become a plain ``IdentityError`` so the caller still fails
    with the CA's message instead of crashing on the lookup.
    """
    if not _BY_REASON:
        for sub in _all_subclasses(IdentityError):
            r = getattr(sub, "reason", None)
            if isinstance(r, str):
                _BY_REASON.setdefault(r, sub)
    cls = _BY_REASON.get(reason, IdentityError)
    return cls(message)
