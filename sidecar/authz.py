"""Inbound authorization: the snapshot's `inbound.authz`, compiled once per snapshot.

Order as in Istio: a matching `deny` rule denies; otherwise, if any `allow` rule exists, the
request must match one of them; otherwise `default` decides (`deny` = default-deny). A rule
holds when every field it gives matches; identity fields (`identity`, `namespace`, `source`)
match only a caller verified by mTLS, never a self-declared header.
"""

from __future__ import annotations

from mesh.snapshot import Authz, AuthzRule
from mesh.spiffe import SpiffeId
from sidecar.http.codec import RequestHead
from sidecar.route import _StrMatcher


class _Rule:
    __slots__ = ("identity", "methods", "namespace", "path", "source", "text")

    def __init__(self, r: AuthzRule, index: int) -> None:
        self.identity = r.identity
        self.namespace = r.namespace
        self.source = r.source
        self.path = _StrMatcher(r.path) if r.path is not None else None
        self.methods = frozenset(m.encode() for m in r.methods)
        self.text = f"{r.action} rule {index}"

    def __call__(self, peer: SpiffeId | None, declared: str | None, head: RequestHead) -> bool:
        if self.identity is not None or self.namespace is not None or self.source is not None:
            if peer is None:
                # No mTLS identity: only a sidecar running without one trusts the declared
                # source (`declared`), and only for `source`.
                if declared is None or self.identity is not None or self.namespace is not None:
                    return False
                if self.source != declared:
                    return False
            else:
                if self.identity is not None and peer.uri != self.identity:
                    return False
                if self.namespace is not None and peer.namespace != self.namespace:
                    return False
                if self.source is not None and peer.service_account != self.source:
                    return False
        if self.methods and head.method not in self.methods:
            return False
        return self.path is None or self.path(head.path)


class Authorizer:
    """`check(peer, declared, head)` -> None if allowed, else the reason for the 403.

    `declared`: the caller's self-declared `x-mesh-source`, given only by a sidecar that has
    no identity (plaintext mesh, as before mTLS); with an identity, identity fields match
    verified callers only."""

    def __init__(self, authz: Authz | None) -> None:
        self.active = authz is not None
        rules = authz.rules if authz is not None else ()
        self.deny = [_Rule(r, i) for i, r in enumerate(rules) if r.action == "deny"]
        self.allow = [_Rule(r, i) for i, r in enumerate(rules) if r.action == "allow"]
        self.default_deny = authz is not None and authz.default == "deny"

    def check(self, peer: SpiffeId | None, declared: str | None,
              head: RequestHead) -> str | None:
        if peer is not None:
            who = peer.uri
        elif declared is not None:
            who = f"source {declared!r} (declared, no mTLS)"
        else:
            who = "an unauthenticated caller"
        for rule in self.deny:
            if rule(peer, declared, head):
                return f"RBAC: access denied: {who} matches inbound.authz {rule.text}"
        if self.allow:
            for rule in self.allow:
                if rule(peer, declared, head):
                    return None
            return f"RBAC: access denied: {who} matches no allow rule of inbound.authz"
        if self.default_deny:
            return f"RBAC: access denied: inbound.authz is default-deny and allows nothing ({who})"
        return None
