"""Resources + registered endpoints -> one proxy snapshot per service. Pure.

Every sidecar of a service gets the same snapshot, holding only what that service needs:
the services it may call (its `dependencies`, or every service when none are listed) with
their routes and clusters, and its own inbound policy (authorization). A `protocol: tcp`
service it may call becomes a TCP listener on 127.0.0.1:<the Service's port> whose cluster
holds every instance in one subset, `default` (no Route: nothing to match in opaque bytes);
a tcp service's own sidecars get `inbound.tcp`, so their inbound listener splices
connections to the app after mTLS and authorization. The snapshot's
`version` is a digest of its content, so the same inputs give the same version on every
control-plane replica and after a restart, and a change that does not touch a service does
not disturb its sidecars.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mesh.errors import ConfigError
from mesh.resources import Resource, ResourceSet, is_tcp, policy_for, route_for
from mesh.snapshot import DEFAULT_TCP_IDLE_TIMEOUT, Snapshot

DEFAULT_SUBSET = "default"


@dataclass(frozen=True, order=True)
class Registration:
    """A sidecar that announced itself: the endpoint other sidecars route to."""

    service: str
    label: str  # the instance's version, matched by DestinationPolicy subsets
    address: str  # host:port of its inbound listener ("" for clients that serve nothing)


@dataclass(frozen=True)
class Compiled:
    service: str
    version: str
    snapshot: dict[str, Any]  # canonical (Snapshot.to_dict of the checked value)


def digest(snapshot: dict[str, Any]) -> str:
    body = {k: v for k, v in snapshot.items() if k != "version"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def mesh_defaults(resources: ResourceSet) -> dict[str, Any]:
    mc = resources.get(("MeshConfig", "default"))
    defaults: dict[str, Any] = mc.spec.get("defaults", {}) if mc else {}
    return defaults


def _services(resources: ResourceSet) -> dict[str, Resource]:
    return {r.name: r for r in resources.values() if r.kind == "Service"}


def _cluster(
    resources: ResourceSet,
    service: str,
    endpoints: Iterable[Registration],
    defaults: dict[str, Any],
    tcp: bool = False,
) -> dict[str, Any]:
    dp = policy_for(resources, service)
    spec = dp.spec if dp else {}
    addresses: dict[str, list[str]] = {}
    for e in endpoints:
        if e.service == service and e.address:
            addresses.setdefault(e.label, []).append(e.address)
    subsets: dict[str, list[str]] = {}
    if spec.get("subsets") and not tcp:
        for name, sel in spec["subsets"].items():
            subsets[name] = sorted(addresses.get(sel["version"], []))
    else:
        subsets[DEFAULT_SUBSET] = sorted(a for eps in addresses.values() for a in eps)
    out: dict[str, Any] = {"name": service, "subsets": subsets}
    for key in ("lb", "hash_header"):
        if key in spec:
            out[key] = spec[key]
    timeout = spec.get("connect_timeout", defaults.get("connect_timeout"))
    if timeout is not None:
        out["connect_timeout"] = timeout
    if "connection_limits" in spec:
        out["circuit_breaker"] = spec["connection_limits"]
    for key in ("outlier", "retry_budget"):
        if key in spec:
            out[key] = spec[key]
    if spec.get("mtls") == "disable":  # its sidecars accept plaintext only
        out["mtls"] = False
    return out


def _routes(
    resources: ResourceSet, service: str, cluster: dict[str, Any], defaults: dict[str, Any]
) -> list[dict[str, Any]]:
    route = route_for(resources, service)
    base: dict[str, Any] = {}
    if "timeout" in defaults:
        base["timeout"] = defaults["timeout"]
    if "retries" in defaults:
        base["retries"] = defaults["retries"]
    if route is None:
        subsets = list(cluster["subsets"])
        rule: dict[str, Any] = {"name": "default", **base}
        if len(subsets) > 1:
            rule["split"] = {s: 1 for s in subsets}
        return [rule]
    out: list[dict[str, Any]] = []
    for i, r in enumerate(route.spec["rules"]):
        rule = {**base, "name": r.get("name", f"{route.name}-{i}")}
        for key in ("match", "split", "timeout", "retries", "fault"):
            if key in r:
                rule[key] = r[key]
        if "mirror" in r:
            rule["mirror"] = {"cluster": cluster["name"], "subset": r["mirror"]["subset"],
                              "percent": r["mirror"].get("percent", 100)}
        if "split" not in rule and len(cluster["subsets"]) > 1:
            rule["split"] = {s: 1 for s in cluster["subsets"]}
        out.append(rule)
    return out


def _inbound(resources: ResourceSet, service: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """AuthorizationPolicies as the snapshot's `inbound.authz` (the sidecar enforces them:
    a matching deny rule denies, then, if any allow rule exists, a request must match one,
    else MeshConfig `defaults.authorization` decides; 403 with flag DENY), and the service's
    DestinationPolicy `mtls` as `inbound.mtls`."""
    rules: list[dict[str, Any]] = []
    policies = sorted(
        (
            r
            for r in resources.values()
            if r.kind == "AuthorizationPolicy" and r.spec["service"] == service
        ),
        key=lambda r: (r.spec["action"] != "deny", r.name),
    )
    for p in policies:
        for rule in p.spec["rules"]:
            out_rule: dict[str, Any] = {"action": p.spec["action"]}
            # `source` stays bare: the enforcing sidecar scopes it to its own namespace (the
            # resources carry none), so only an explicit `namespace` is written here.
            for key in ("source", "namespace", "path", "methods"):
                if rule.get(key) is not None:
                    out_rule[key] = rule[key]
            rules.append(out_rule)
    out: dict[str, Any] = {"faults": []}
    default = defaults.get("authorization", "allow")
    if policies or default == "deny":
        out["authz"] = {"rules": rules, "default": default}
    dp = policy_for(resources, service)
    if dp is not None and "mtls" in dp.spec:
        out["mtls"] = dp.spec["mtls"].upper()
    if "inbound_timeout" in defaults:
        out["timeout"] = defaults["inbound_timeout"]
    return out


def compile_service(
    resources: ResourceSet, endpoints: Iterable[Registration], service: str
) -> Compiled:
    """The snapshot for every sidecar of `service`. Raises ConfigError only on a bug or an
    unchecked resource (the result is checked by Snapshot.from_dict like any file)."""
    endpoints = list(endpoints)
    defaults = mesh_defaults(resources)
    services = _services(resources)
    me = services.get(service)
    targets = sorted(me.spec.get("dependencies", services) if me else services)
    svc_out: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    tcp: list[dict[str, Any]] = []
    for name in targets:
        target = services[name]
        if is_tcp(target) and name == service:
            continue  # its own sidecars serve it (inbound.tcp); a listener would call itself
        cluster = _cluster(resources, name, endpoints, defaults, tcp=is_tcp(target))
        clusters.append(cluster)
        if is_tcp(target):
            tcp.append({
                "name": name, "port": target.spec["port"], "cluster": name,
                "subset": DEFAULT_SUBSET,
                "idle_timeout": target.spec.get("idle_timeout", DEFAULT_TCP_IDLE_TIMEOUT),
            })  # fmt: skip
            continue
        hosts = [name, *target.spec.get("hosts", [])]
        svc_out.append(
            {"name": name, "hosts": hosts, "routes": _routes(resources, name, cluster, defaults)}
        )
    inbound = _inbound(resources, service, defaults)
    if me is not None and is_tcp(me):
        inbound["tcp"] = {"idle_timeout": me.spec.get("idle_timeout", DEFAULT_TCP_IDLE_TIMEOUT)}
    raw = {
        "version": "0",
        "service": service,
        "inbound": inbound,
        "services": svc_out,
        "clusters": clusters,
        "tcp": tcp,
    }
    try:
        checked = Snapshot.from_dict(raw).to_dict()
        Snapshot.from_dict(checked)  # what every sidecar will do with it
    except ConfigError as exc:
        raise ConfigError(f"compiling the snapshot for {service!r}: {exc}") from None
    version = digest(checked)
    checked["version"] = version
    return Compiled(service=service, version=version, snapshot=checked)


def compile_all(
    resources: ResourceSet, endpoints: Iterable[Registration], services: Iterable[str]
) -> dict[str, Compiled]:
    endpoints = list(endpoints)
    return {s: compile_service(resources, endpoints, s) for s in sorted(set(services))}
