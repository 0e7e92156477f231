"""Authorization of opaque TCP connections by caller identity. Pure.

The snapshot's `inbound.authz` (the same rules as HTTP, sidecar/authz.py) decided per
connection, before any byte reaches the app. Only identity fields (`identity`,
`namespace`, `source`) can be checked on opaque TCP; for rules that also name
HTTP-only fields (`path`, `methods`) we follow Istio:

- an `allow` rule with an HTTP-only field never matches a TCP connection (it allows
  nothing, so TCP does not get in through a rule written for some path);
- a `deny` rule with HTTP-only fields is matched on its other fields alone: it denies
  more rather than less (fail closed).

Identity fields match only a caller verified by mTLS; a plaintext caller (PERMISSIVE or
DISABLE) has no identity, so it matches no identity rule. A `source` without `namespace`
means that service account in this sidecar's own namespace, exactly as for HTTP
(sidecar/authz.py, `peer_namespace`).
"""

from __future__ import annotations

from mesh.snapshot import Authz, AuthzRule
from mesh.spiffe import SpiffeId
from sidecar.authz import peer_namespace


def _identity_matches(rule: AuthzRule, peer: SpiffeId | None,
                      own_namespace: str | None) -> bool:
    if rule.identity is None and rule.namespace is None and rule.source is None:
        return True
    if peer is None:
        return False
    namespace, can_match = peer_namespace(rule, own_namespace)
    if not can_match:
        return False
    if rule.identity is not None and peer.uri != rule.identity:
        return False
    if namespace is not None and peer.namespace != namespace:
        return False
    return rule.source is None or peer.service_account == rule.source


def _http_only(rule: AuthzRule) -> bool:
    return rule.path is not None or bool(rule.methods)


def check_tcp(authz: Authz | None, peer: SpiffeId | None,
              namespace: str | None = None) -> str | None:
    """None if the connection is allowed, else why not (for the log line). `namespace`: this
    sidecar's own namespace, the scope of a `source` given without `namespace`."""
    if authz is None:
        return None
    who = peer.uri if peer is not None else "an unauthenticated caller"
    for i, rule in enumerate(authz.rules):
        if rule.action == "deny" and _identity_matches(rule, peer, namespace):
            extra = " (its HTTP-only fields are ignored for TCP)" if _http_only(rule) else ""
            return f"RBAC: access denied: {who} matches inbound.authz deny rule {i}{extra}"
    allow = [(i, r) for i, r in enumerate(authz.rules) if r.action == "allow"]
    if allow:
        for _, rule in allow:
            if not _http_only(rule) and _identity_matches(rule, peer, namespace):
                return None
        return f"RBAC: access denied: {who} matches no allow rule of inbound.authz for TCP"
    if authz.default == "deny":
        return f"RBAC: access denied: inbound.authz is default-deny and allows nothing ({who})"
    return None
