"""Compile (resources + endpoints -> per-service snapshots) and the sans-io sync protocol."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_resources import GOOD, as_set

from mesh.compile import Registration, compile_all, compile_service
from mesh.errors import ConfigError
from mesh.messages import ConfigHeartbeat, SnapshotPush, SnapshotRequest, decode, encode
from mesh.resources import merged, parse_text
from mesh.snapshot import Snapshot
from mesh.sync import (
    NACKED,
    STALE,
    SYNCED,
    Apply,
    ClientSync,
    Ignore,
    RequestFull,
    ServerSync,
    apply_delta,
    make_delta,
)

EPS = [
    Registration("reviews", "v1", "127.0.0.1:1001"),
    Registration("reviews", "v2", "127.0.0.1:1002"),
    Registration("reviews", "v3", "127.0.0.1:1003"),
    Registration("productpage", "v1", "127.0.0.1:2001"),
]


def test_compile_gives_each_service_only_what_it_needs() -> None:
    resources = as_set(GOOD)
    pp = compile_service(resources, EPS, "productpage")
    snap = Snapshot.from_dict(pp.snapshot)
    # productpage lists reviews as its only dependency
    assert [s.name for s in snap.services] == ["reviews"]
    assert snap.services[0].hosts == ("reviews", "reviews.default")
    cluster = snap.cluster("reviews")
    assert cluster is not None and cluster.lb == "least_request"
    assert [(n, [str(e) for e in eps]) for n, eps in cluster.subsets] == [
        ("v1", ["127.0.0.1:1001"]),
        ("v2", ["127.0.0.1:1002"]),
    ]  # v3 is in no subset
    assert cluster.circuit_breaker.max_requests == 100
    canary = snap.services[0].routes[1]
    assert canary.split == (("v1", 95), ("v2", 5)) and canary.timeout == 2
    # the MeshConfig default timeout applies where a rule sets none
    assert snap.services[0].routes[0].timeout == 5
    assert snap.inbound.faults == ()
    # reviews declares no dependencies: it may call every service; its inbound is authorized
    rv = Snapshot.from_dict(compile_service(resources, EPS, "reviews").snapshot)
    assert [s.name for s in rv.services] == ["productpage", "reviews"]
    assert rv.inbound.faults == ()
    authz = rv.inbound.authz
    assert authz is not None and len(authz.rules) == 1
    rule = authz.rules[0]
    assert (rule.action, rule.source, rule.methods) == ("allow", "productpage", ("GET",))


def test_mesh_wide_default_deny_closes_services_no_policy_opens() -> None:
    text = GOOD.replace("defaults: {timeout: 5,", "defaults: {authorization: deny, timeout: 5,")
    assert text != GOOD
    resources = as_set(text)
    # productpage has no AuthorizationPolicy: closed to every caller.
    pp = Snapshot.from_dict(compile_service(resources, EPS, "productpage").snapshot).inbound.authz
    assert pp is not None and (pp.default, pp.rules) == ("deny", ())
    # reviews' allow policy still lets productpage in, and only it.
    rv = Snapshot.from_dict(compile_service(resources, EPS, "reviews").snapshot).inbound.authz
    assert rv is not None and rv.default == "deny" and [r.source for r in rv.rules] == ["productpage"]
    # The default (allow) leaves a service without policies open, as before.
    open_pp = compile_service(as_set(GOOD), EPS, "productpage").snapshot
    assert "authz" not in open_pp["inbound"]
    bad = GOOD.replace("defaults: {timeout: 5,", "defaults: {authorization: maybe, timeout: 5,")
    with pytest.raises(ConfigError, match=r"defaults\.authorization: 'maybe' is not one of allow"):
        as_set(bad)


def test_authz_source_stays_bare_and_an_explicit_namespace_is_compiled() -> None:
    # A bare source is scoped by the enforcing sidecar to its own namespace; a rule naming
    # `namespace` opens the service to that service account in that namespace only.
    resources = merged(as_set(GOOD), parse_text(
        "kind: AuthorizationPolicy\nname: pp-from-ops\nspec: {service: reviews, action: allow, "
        "rules: [{source: productpage, namespace: ops}]}", "ns.yaml"))
    rv = Snapshot.from_dict(compile_service(resources, EPS, "reviews").snapshot).inbound.authz
    assert rv is not None
    assert [(r.source, r.namespace) for r in rv.rules] == [
        ("productpage", "ops"), ("productpage", None)]
    with pytest.raises(ConfigError, match=r"spec\.rules\[0\]\.namespace: 'Ops' is not a valid"):
        parse_text("kind: AuthorizationPolicy\nname: bad\nspec: {service: reviews, "
                   "action: allow, rules: [{source: productpage, namespace: Ops}]}", "bad.yaml")


def test_a_mirror_compiles_to_the_routes_cluster_and_subset() -> None:
    resources = merged(as_set(GOOD), parse_text(
        "kind: Route\nname: reviews\nspec: {service: reviews, rules: [{split: {v1: 1}, "
        "mirror: {subset: v2, percent: 10}}, {split: {v1: 1}, mirror: {subset: v2}}]}",
        "m.yaml"))
    raw = compile_service(resources, EPS, "productpage").snapshot
    routes = raw["services"][0]["routes"]
    assert routes[0]["mirror"] == {"cluster": "reviews", "subset": "v2", "percent": 10}
    assert routes[1]["mirror"] == {"cluster": "reviews", "subset": "v2", "percent": 100}
    mirror = Snapshot.from_dict(raw).services[0].routes[0].mirror
    assert mirror is not None and (mirror.cluster, mirror.subset, mirror.percent) == (
        "reviews", "v2", 10)


def test_versions_are_content_digests() -> None:
    resources = as_set(GOOD)
    a = compile_all(resources, EPS, ["productpage", "reviews"])
    b = compile_all(resources, list(reversed(EPS)), ["reviews", "productpage"])
    assert {k: v.version for k, v in a.items()} == {k: v.version for k, v in b.items()}
    # a change to productpage's own inbound policy does not touch reviews' snapshot? it does
    # not: reviews' sidecars see only productpage's routes, which did not change
    deny = parse_text(
        "kind: AuthorizationPolicy\nname: pp\nspec: {service: productpage, "
        "action: deny, rules: [{path: {prefix: /admin}}]}",
        "x.yaml",
    )
    c = compile_all(merged(resources, deny), EPS, ["productpage", "reviews"])
    assert c["reviews"].version == a["reviews"].version
    assert c["productpage"].version != a["productpage"].version
    pp = Snapshot.from_dict(c["productpage"].snapshot)
    assert pp.inbound.authz is not None and pp.inbound.authz.rules[0].action == "deny"


def snapshot_dicts() -> st.SearchStrategy[dict[str, Any]]:
    names = st.sampled_from(["a", "b", "c", "d"])

    def build(services: list[str], weights: list[int], limits: int) -> dict[str, Any]:
        svcs = sorted(set(services))
        return {
            "version": "x",
            "service": "me",
            "limits": {"max_header_bytes": limits},
            "services": [
                {"name": s, "routes": [{"split": {"v1": w + 1}}]}
                for s, w in zip(svcs, weights, strict=False)
            ],
            "clusters": [
                {"name": s, "subsets": {"v1": [f"127.0.0.1:{1000 + w}"]}}
                for s, w in zip(svcs, weights, strict=False)
            ],
        }

    return st.builds(
        build,
        st.lists(names, max_size=4),
        st.lists(st.integers(0, 5), min_size=4, max_size=4),
        st.sampled_from([1024, 2048]),
    )


@settings(max_examples=200, deadline=None)
@given(snapshot_dicts(), snapshot_dicts())
def test_apply_delta_of_make_delta_is_the_new_snapshot(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    delta = make_delta(old, new)
    got = apply_delta(old, delta, "v9")

    def norm(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if v not in (None, [])}

    assert norm(got) == norm({**new, "version": "v9"})
    # and it survives the wire
    push = SnapshotPush(service="me", version="v9", base="x", nonce="n", full=False, body=delta)
    assert decode(encode(push)) == push


def client() -> ClientSync:
    return ClientSync(
        instance="pp-1",
        service="productpage",
        label="v1",
        address="127.0.0.1:1",
        admin="127.0.0.1:2",
    )


def full(version: str, body: dict[str, Any]) -> SnapshotPush:
    return SnapshotPush(
        service="productpage", version=version, base="", nonce="n" + version, full=True, body=body
    )


def test_client_applies_full_then_deltas_and_acks_with_the_nonce() -> None:
    c = client()
    s1 = {"version": "a", "services": []}
    act = c.on_push(full("a", s1))
    assert isinstance(act, Apply) and act.snapshot == s1
    ack = c.applied(None)
    assert (ack.ok, ack.version, ack.nonce) == (True, "a", "na") and c.version == "a"
    s2 = {"version": "b", "services": [{"name": "x", "routes": []}]}
    delta = SnapshotPush(
        service="productpage",
        version="b",
        base="a",
        nonce="nb",
        full=False,
        body=make_delta(s1, s2),
    )
    act = c.on_push(delta)
    assert isinstance(act, Apply) and act.snapshot["services"] == s2["services"]
    ack = c.applied("services[0].routes: refused")
    assert (ack.ok, ack.reason, c.version, c.nacked) == (
        False,
        "services[0].routes: refused",
        "a",
        "b",
    )
    assert isinstance(c.on_push(delta), Ignore)  # the same refused version again
    # a delta on a base this sidecar does not have: keep the old one, ask for a full snapshot
    gap = SnapshotPush(
        service="productpage", version="c", base="b", nonce="nc", full=False, body={}
    )
    act = c.on_push(gap)
    assert isinstance(act, RequestFull) and "gap: have a" in act.reason and c.resyncs == 1
    assert c.version == "a"
    assert isinstance(c.on_push(full("a", s1)), Ignore)  # already there
    other = SnapshotPush(
        service="productpage", version="z", base="", nonce="", full=True, body={}, instance="pp-2"
    )
    assert isinstance(c.on_push(other), Ignore)
    hb = c.heartbeat(1.0)
    assert (hb.acked, hb.nacked, hb.resyncs) == ("a", "b", 1)


def hb(
    instance: str,
    acked: str = "",
    nacked: str = "",
    address: str = "127.0.0.1:1",
    service: str = "reviews",
    label: str = "v1",
) -> ConfigHeartbeat:
    return ConfigHeartbeat(
        instance=instance,
        service=service,
        label=label,
        address=address,
        acked=acked,
        nacked=nacked,
        reason="bad" if nacked else "",
    )


def test_server_books_pushes_status_and_healing() -> None:
    resources = as_set(GOOD)
    s = ServerSync()
    assert s.on_request(
        SnapshotRequest(instance="r1", service="reviews", label="v1", address="127.0.0.1:1001"),
        now=0.0,
    )
    s.on_heartbeat(hb("r2", label="v2", address="127.0.0.1:1002"), now=0.0)
    assert s.update(compile_all(resources, s.registrations(), s.wanted_services())) == []
    first = s.full_for("reviews")
    assert first is not None and first.full
    v1 = first.version
    rows = {r["instance"]: r for r in s.status(0.5)}
    assert rows["r1"]["status"] == STALE and rows["r1"]["current"] == v1
    # r1 ACKs; r2 heartbeats with nothing: it gets a targeted full snapshot
    s.on_heartbeat(hb("r1", acked=v1, address="127.0.0.1:1001"), now=1.0)
    changed, push = s.on_heartbeat(hb("r2", label="v2", address="127.0.0.1:1002"), now=3.0)
    assert not changed and push is not None and push.instance == "r2" and push.full
    # ...but not again right away
    assert s.on_heartbeat(hb("r2", label="v2", address="127.0.0.1:1002"), now=3.5) == (False, None)
    # a change gives one delta per changed service, based on the previous version
    dp = parse_text(
        "kind: DestinationPolicy\nname: reviews\nspec: {service: reviews, subsets: "
        "{v1: {version: v1}, v2: {version: v2}}, lb: hash, hash_header: x-user}",
        "dp.yaml",
    )
    pushes = s.update(compile_all(merged(resources, dp), s.registrations(), s.wanted_services()))
    assert len(pushes) == 1 and pushes[0].base == v1 and not pushes[0].full
    v2 = pushes[0].version
    from mesh.messages import ConfigAck

    s.on_ack(ConfigAck(instance="r1", service="reviews", version=v2, nonce="", ok=True), 4.0)
    s.on_ack(
        ConfigAck(instance="r2", service="reviews", version=v2, nonce="", ok=False, reason="no"),
        4.0,
    )
    rows = {r["instance"]: r for r in s.status(4.0)}
    assert rows["r1"]["status"] == SYNCED
    assert rows["r2"]["status"] == NACKED and rows["r2"]["reason"] == f"refused {v2}: no"
    # a NACKed sidecar is not flooded with the version it refused
    assert s.on_heartbeat(hb("r2", label="v2", address="127.0.0.1:1002", nacked=v2), now=9.0) == (
        False,
        None,
    )
    # silence expires a sidecar (its endpoint leaves the registry); leaving is immediate
    assert s.expire(now=9.5) and "r1" not in s.peers
    assert s.on_heartbeat(
        ConfigHeartbeat(instance="r2", service="reviews", label="v2", leaving=True), now=9.6
    ) == (True, None)
    assert s.registrations() == []


def test_many_random_changes_converge() -> None:
    """A client fed a random mix of deltas, lost pushes and full resyncs ends at the server's
    version with the server's exact snapshot."""
    rng = random.Random(7)
    resources = as_set(GOOD)
    s = ServerSync()
    c = client()
    c.service = "reviews"
    eps = list(EPS)
    s.update(compile_all(resources, eps, ["reviews"]))

    def deliver(push: SnapshotPush) -> None:
        act = c.on_push(push)
        if isinstance(act, RequestFull):
            answer = s.full_for("reviews")
            assert answer is not None
            act = c.on_push(answer)
        if isinstance(act, Apply):
            c.applied(None)

    first = s.full_for("reviews")
    assert first is not None
    deliver(first)
    for i in range(50):
        eps.append(Registration("reviews", rng.choice(["v1", "v2"]), f"127.0.0.1:{3000 + i}"))
        if rng.random() < 0.3:
            eps.pop(rng.randrange(len(eps)))
        for push in s.update(compile_all(resources, eps, ["reviews"])):
            if rng.random() < 0.8:  # 20% of pushes are lost
                deliver(push)
    final = s.full_for("reviews")
    assert final is not None
    deliver(final)  # what a heartbeat-triggered heal sends
    assert c.version == s.services["reviews"].compiled.version
    assert c.snapshot == s.services["reviews"].compiled.snapshot


def test_no_heal_while_a_delta_may_be_in_flight() -> None:
    resources = as_set(GOOD)
    s = ServerSync()
    s.on_heartbeat(hb("r1", address="127.0.0.1:1001"), now=0.0)
    s.update(compile_all(resources, s.registrations(), s.wanted_services()), now=0.0)
    v1 = s.services["reviews"].compiled.version
    dp = parse_text(
        "kind: DestinationPolicy\nname: reviews\nspec: {service: reviews, subsets: "
        "{v1: {version: v1}, v2: {version: v2}}, lb: least_request}",
        "dp.yaml",
    )
    (push,) = s.update(
        compile_all(merged(resources, dp), s.registrations(), s.wanted_services()), now=10.0
    )
    # the sidecar's heartbeat still says v1: the delta is on its way, no full snapshot yet
    assert s.on_heartbeat(hb("r1", acked=v1, address="127.0.0.1:1001"), now=10.5) == (False, None)
    _, heal = s.on_heartbeat(hb("r1", acked=v1, address="127.0.0.1:1001"), now=12.5)
    assert heal is not None and heal.version == push.version and heal.instance == "r1"


def test_a_push_for_another_service_is_ignored() -> None:
    # Someone with bus access sent frontend's snapshot to productpage's subject: applying
    # it would replace productpage's authorization and mTLS with frontend's.
    c = client()
    other = SnapshotPush(service="frontend", version="f", base="", nonce="nf", full=True,
                         body={"version": "f", "services": []})
    act = c.on_push(other)
    assert isinstance(act, Ignore) and "frontend" in act.reason and c.version == ""


def test_registrations_with_names_unusable_in_subjects_are_dropped() -> None:
    s = ServerSync()
    bad = [ConfigHeartbeat(instance="i-1", service="x.y", label="v1", address="127.0.0.1:1"),
           ConfigHeartbeat(instance="a>b", service="ok", label="v1", address="127.0.0.1:1"),
           ConfigHeartbeat(instance="", service="ok", label="v1")]
    for hb in bad:
        assert s.on_heartbeat(hb, 1.0) == (False, None)
    req = SnapshotRequest(instance="i-2", service="*", label="v1", address="", admin="",
                          have="", reason="start")
    assert s.on_request(req, 1.0) is False
    assert s.peers == {}
    good = ConfigHeartbeat(instance="i-1", service="ok", label="v1", address="127.0.0.1:1")
    assert s.on_heartbeat(good, 1.0)[0] is True
