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


def authorizer(authz: dict[str, Any]) -> Authorizer:
    snap = Snapshot.from_dict({"version": "1", "inbound": {"authz": authz}})
    assert Snapshot.from_dict(snap.to_dict()) == snap
    return Authorizer(snap.inbound.authz)


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
