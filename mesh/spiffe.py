"""SPIFFE IDs of mesh workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

The syntax rules follow the SPIFFE-ID spec (trust domain: lowercase letters, digits, ``.-_``;
path segments: letters, digits, ``.-_``, never empty, ``.`` or ``..``; no port, user info, query
or fragment). On top of that the mesh fixes the path shape to ``/ns/<ns>/sa/<sa>`` so that a
policy can match on namespace or service account without guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from mesh.pki_errors import SpiffeIdError

__all__ = [
    "SCHEME_PREFIX",
    "SpiffeId",
    "parse_spiffe_id",
    "validate_name",
    "validate_trust_domain",
]

SCHEME_PREFIX = "spiffe://"
_MAX_URI_BYTES = 2048  # SPIFFE-ID spec: IDs longer than 2048 bytes may be rejected
_MAX_TRUST_DOMAIN = 255
_MAX_NAME = 253  # same cap as a Kubernetes namespace / DNS name; keeps IDs readable

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if valid, else raise ``SpiffeIdError`` saying what is wrong."""
    if not trust_domain:
        raise SpiffeIdError("trust domain is empty")
    if len(trust_domain) > _MAX_TRUST_DOMAIN:
        raise SpiffeIdError(
            f"trust domain is {len(trust_domain)} characters long, the limit is {_MAX_TRUST_DOMAIN}"
        )
    if _TRUST_DOMAIN_RE.fullmatch(trust_domain) is None:
        bad = sorted({c for c in trust_domain if _TRUST_DOMAIN_RE.fullmatch(c) is None})
        hint = " (trust domains are lowercase)" if any(c.isupper() for c in bad) else ""
        raise SpiffeIdError(
            f"trust domain {trust_domain!r} contains {''.join(bad)!r}: only lowercase letters, "
            f"digits, '.', '-' and '_' are allowed{hint}"
        )
    return trust_domain


def validate_name(kind: str, value: str) -> str:
    """Validate a namespace or service-account name (one SPIFFE path segment)."""
    if not value:
        raise SpiffeIdError(f"{kind} is empty")
    if value in (".", ".."):
        raise SpiffeIdError(f"{kind} {value!r} is not allowed (relative path segment)")
    if len(value) > _MAX_NAME:
        raise SpiffeIdError(f"{kind} is {len(value)} characters long, the limit is {_MAX_NAME}")
    if _SEGMENT_RE.fullmatch(value) is None:
        bad = sorted({c for c in value if _SEGMENT_RE.fullmatch(c) is None})
        raise SpiffeIdError(
            f"{kind} {value!r} contains {''.join(bad)!r}: only letters, digits, '.', '-' and "
            f"'_' are allowed"
        )
    return value


@dataclass(frozen=True, slots=False)
class SpiffeId:
    """One workload identity. Construct with validated parts, or via ``SpiffeId.parse``.

    Hashable and comparable, so it can key dicts (authorization policies, expected peers).
    """

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_name("namespace", self.namespace)
        validate_name("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        return parse_spiffe_id(uri)

    @cached_property
    def uri(self) -> str:
        """The URI form, as it appears in the certificate's URI SAN."""
        return f"{SCHEME_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def trust_domain_uri(self) -> str:
        """``spiffe://<td>``: the trust domain's own ID (put on CA certificates)."""
        return f"{SCHEME_PREFIX}{self.trust_domain}"

    def __str__(self) -> str:
        return self.uri


def parse_spiffe_id(uri: str, *, trust_domain: str | None = None) -> SpiffeId:
    """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``; if ``trust_domain`` is given it must match.

    Raises ``SpiffeIdError`` with a message naming the first problem found.
    """
    if len(uri.encode("utf-8", "surrogatepass")) > _MAX_URI_BYTES:
        raise SpiffeIdError(f"SPIFFE ID is longer than {_MAX_URI_BYTES} bytes")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise SpiffeIdError(f"{uri!r} is not a SPIFFE ID: it must start with 'spiffe://'")
    if scheme != "spiffe":
        hint = " (the scheme is lowercase)" if scheme.lower() == "spiffe" else ""
        raise SpiffeIdError(
            f"{uri!r} is not a SPIFFE ID: scheme is {scheme!r}, expected 'spiffe'{hint}"
        )
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in rest:
            raise SpiffeIdError(f"SPIFFE ID {uri!r} must not contain {what} ({char!r})")
    td, slash, path = rest.partition("/")
    if "@" in td:
        raise SpiffeIdError(f"SPIFFE ID {uri!r} must not contain user info ('@')")
    if ":" in td:
        raise SpiffeIdError(f"SPIFFE ID {uri!r} must not contain a port in the trust domain")
    validate_trust_domain(td)
    if trust_domain is not None and td != trust_domain:
        raise SpiffeIdError(
            f"SPIFFE ID {uri!r} belongs to trust domain {td!r}, expected {trust_domain!r}"
        )
    if not slash or not path:
        raise SpiffeIdError(
            f"SPIFFE ID {uri!r} has no workload path: expected "
            f"spiffe://{td}/ns/<namespace>/sa/<service-account>"
        )
    segments = path.split("/")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise SpiffeIdError(
            f"SPIFFE ID {uri!r} has path '/{path}': the mesh expects "
            f"/ns/<namespace>/sa/<service-account>"
        )
    return SpiffeId(td, segments[1], segments[3])
