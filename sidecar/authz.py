"""Inbound authorization: the snapshot's `inbound.authz`, compiled once per snapshot.

Order as in Istio: a matching `deny` rule denies; otherwise, if any `allow` rule exists, the
request must match one of them; otherwise `default` decides (`deny` = default-deny). A rule
holds when every field it gives matches; identity fields (`identity`, `namespace`, `source`)
match only a caller verified by mTLS, never a self-declared header.

`source` is a service account *in this sidecar's own namespace* unless the rule also names
`namespace`: a service account name is only unique within a namespace, so without that scope
`source: frontend` would admit `spiffe://<td>/ns/<anyone's>/sa/frontend` (Istio's
`principals` always carry the namespace for the same reason). This matches how the mesh reads
a bare service name elsewhere: a cluster without `identity` expects the server in the
sidecar's own namespace (sidecar/mtls.py).
"""

from __future__ import annotations

from mesh.snapshot import Authz, AuthzRule
from mesh.spiffe import SpiffeId
from sidecar.http.codec import RequestHead
from sidecar.route import _StrMatcher


def peer_namespace(rule: AuthzRule, own_namespace: str | None) -> tuple[str | None, bool]:
    """The namespace a verified caller must be in for `rule`, and whether the rule can match a
    verified caller at all.

    Without an own namespace (a sidecar that has no identity of its own, so no verified
    callers either in practice) a bare `source` cannot be scoped; rather than fall back to
    "any namespace", an `allow` rule then admits no verified caller and a `deny` rule denies
    the service account in every namespace: fail closed both ways."""
    if rule.namespace is not None or rule.source is None:
        return rule.namespace, True
    if own_namespace is not None:
        return own_namespace, True
    return None, rule.action == "deny"


class _Rule:
    __slots__ = ("declared_ok", "identity", "methods", "namespace", "path", "peer_ok",
                 "scoped", "source", "text")

    def __init__(self, r: AuthzRule, index: int, own_namespace: str | None) -> None:
        self.identity = r.identity
        self.source = r.source
        # `scoped`: the rule names any identity field, so it needs a caller to match it.
        self.scoped = r.identity is not None or r.namespace is not None or r.source is not None
        # The declared source (no mTLS) carries no namespace, so only a rule that names
        # nothing but `source` can hold for it: as before namespaces were enforced.
        self.declared_ok = r.identity is None and r.namespace is None
        self.namespace, self.peer_ok = peer_namespace(r, own_namespace)
        self.path = _StrMatcher(r.path) if r.path is not None else None
        self.methods = frozenset(m.encode() for m in r.methods)
        self.text = f"{r.action} rule {index}"

    def __call__(self, peer: SpiffeId | None, declared: str | None, head: RequestHead) -> bool:
        if self.scoped:
            if peer is None:
                # No mTLS identity: only a sidecar running without one trusts the declared
                # source (`declared`), and only for `source`.
                if declared is None or not self.declared_ok or self.source != declared:
                    return False
            else:
                if not self.peer_ok:
                    return False
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
    verified callers only. `namespace`: this sidecar's own namespace (from its SPIFFE ID),
    the scope of a rule's `source` when the rule names no `namespace`."""

    def __init__(self, authz: Authz | None, namespace: str | None = None) -> None:
        self.active = authz is not None
        self.namespace = namespace
        rules = authz.rules if authz is not None else ()
        self.deny = [_Rule(r, i, namespace) for i, r in enumerate(rules) if r.action == "deny"]
        self.allow = [_Rule(r, i, namespace) for i, r in enumerate(rules)
                      if r.action == "allow"]
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
