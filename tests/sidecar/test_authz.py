"""inbound.authz: parsing and the Istio-style decision order (deny, then allow, then default)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.snapshot import Snapshot
from mesh.spiffe import SpiffeId
from sidecar.authz import Authorizer
from sidecar.http.codec import RequestHead

CHECKOUT = SpiffeId("t.mesh", "shop", "checkout")
REVIEWS = SpiffeId("t.mesh", "shop", "reviews")
OUTSIDER = SpiffeId("t.mesh", "other", "checkout")


def authorizer(authz: dict[str, Any], namespace: str | None = "shop") -> Authorizer:
    """As the sidecar builds it; `namespace` is the sidecar's own (from its SPIFFE ID)."""
    snap = Snapshot.from_dict({"version": "1", "inbound": {"authz": authz}})
    assert Snapshot.from_dict(snap.to_dict()) == snap
    return Authorizer(snap.inbound.authz, namespace)


def head(method: str = "GET", path: str = "/") -> RequestHead:
    return RequestHead(method.encode(), path.encode(), "1.1", [], True, False, False, None)


def test_allow_rules_deny_the_rest_and_deny_wins() -> None:
    a = authorizer({"rules": [
        {"action": "allow", "source": "checkout", "namespace": "shop"},
        {"action": "deny", "source": "checkout", "path": {"prefix": "/admin"}},
        {"action": "allow", "identity": REVIEWS.uri, "methods": ["get"]},
    ]})
    assert a.check(CHECKOUT, None, head()) is None
    assert a.check(OUTSIDER, None, head()) is not None  # wrong namespace
    denied = a.check(CHECKOUT, None, head(path="/admin/x"))
    assert denied is not None and "deny rule 1" in denied and CHECKOUT.uri in denied
    assert a.check(REVIEWS, None, head()) is None
    assert a.check(REVIEWS, None, head("POST")) is not None
    assert a.check(None, None, head()) is not None  # identity rules need a verified caller


def test_source_without_namespace_means_the_sidecars_own_namespace() -> None:
    frontend = SpiffeId("t.mesh", "shop", "frontend")
    evil_frontend = SpiffeId("t.mesh", "evil", "frontend")
    a = authorizer({"rules": [{"action": "allow", "source": "frontend"}]})
    assert a.check(frontend, None, head()) is None
    denied = a.check(evil_frontend, None, head())
    assert denied is not None and evil_frontend.uri in denied
    # An explicit namespace is the rule's own scope, whatever the sidecar's namespace.
    other = authorizer({"rules": [{"action": "allow", "source": "frontend", "namespace": "evil"}]})
    assert other.check(evil_frontend, None, head()) is None
    assert other.check(frontend, None, head()) is not None
    # Deny rules are scoped the same way: the same name in another namespace is another caller.
    deny = authorizer({"rules": [{"action": "deny", "source": "frontend"}]})
    assert deny.check(frontend, None, head()) is not None
    assert deny.check(evil_frontend, None, head()) is None
    # The declared source of a sidecar without identity carries no namespace: as before.
    assert authorizer({"rules": [{"action": "allow", "source": "frontend"}]}, None).check(
        None, "frontend", head()) is None


def test_bare_source_fails_closed_when_the_own_namespace_is_unknown() -> None:
    frontend = SpiffeId("t.mesh", "shop", "frontend")
    allow = authorizer({"rules": [{"action": "allow", "source": "frontend"}]}, None)
    assert allow.check(frontend, None, head()) is not None
    deny = authorizer({"rules": [{"action": "deny", "source": "frontend"}]}, None)
    assert deny.check(SpiffeId("t.mesh", "evil", "frontend"), None, head()) is not None
    assert deny.check(REVIEWS, None, head()) is None


def test_declared_source_only_without_identity() -> None:
    a = authorizer({"rules": [{"action": "allow", "source": "checkout"}]})
    assert a.check(None, "checkout", head()) is None
    assert a.check(None, "reviews", head()) is not None
    ns = authorizer({"rules": [{"action": "allow", "namespace": "shop"}]})
    assert ns.check(None, "checkout", head()) is not None


def test_default_deny_and_no_policy() -> None:
    assert authorizer({"default": "deny"}).check(CHECKOUT, None, head()) is not None
    only_deny = authorizer({"rules": [{"action": "deny", "path": {"exact": "/x"}}]})
    assert only_deny.check(CHECKOUT, None, head()) is None
    assert only_deny.check(CHECKOUT, None, head(path="/x")) is not None
    assert Authorizer(None).check(None, None, head()) is None


@pytest.mark.parametrize(("inbound", "message"), [
    ({"authz": {"rules": [{"action": "maybe"}]}}, "inbound.authz.rules[0].action"),
    ({"authz": {"rules": [{"action": "allow", "identity": "spiffe://T/x"}]}},
     "inbound.authz.rules[0].identity"),
    ({"authz": {"default": "sometimes"}}, "inbound.authz.default"),
    ({"mtls": "loose"}, "inbound.mtls"),
])
def test_bad_authz_names_the_field(inbound: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Snapshot.from_dict({"version": "1", "inbound": inbound})
