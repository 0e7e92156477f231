"""`protocol: tcp` Services: checked by the resource model, compiled into the callers' TCP
listeners and the destination's inbound TCP listener."""

from __future__ import annotations

import pytest
from test_resources import as_set

from mesh.compile import Registration, compile_service
from mesh.errors import ConfigError
from mesh.resources import validate_set
from mesh.snapshot import InboundTcp, Snapshot

TEXT = """
kind: Service
name: catalog
spec: {dependencies: [ratings, stock]}
---
kind: Service
name: ratings
---
kind: Service
name: stock
spec: {protocol: tcp, port: 16379, idle_timeout: 600}
---
kind: DestinationPolicy
name: stock
spec: {service: stock, subsets: {v1: {version: v1}}, connect_timeout: 0.5}
---
kind: AuthorizationPolicy
name: stock-callers
spec: {service: stock, action: allow, rules: [{source: catalog}]}
"""
ENDPOINTS = [
    Registration("stock", "v1", "127.0.0.1:7001"),
    Registration("stock", "v2", "127.0.0.1:7002"),
    Registration("ratings", "v1", "127.0.0.1:7003"),
]


def test_a_tcp_service_compiles_to_caller_listeners_and_an_inbound_tcp_listener() -> None:
    resources = as_set(TEXT)
    validate_set(resources)
    catalog = Snapshot.from_dict(compile_service(resources, ENDPOINTS, "catalog").snapshot)
    [listener] = catalog.tcp
    assert (listener.name, listener.port, listener.cluster, listener.subset,
            listener.idle_timeout) == ("stock", 16379, "stock", "default", 600.0)
    cluster = catalog.cluster("stock")
    assert cluster is not None and cluster.connect_timeout == 0.5
    # No Route for opaque bytes: every instance is in the one subset, whatever its version.
    assert [(n, [str(e) for e in eps]) for n, eps in cluster.subsets] == [
        ("default", ["127.0.0.1:7001", "127.0.0.1:7002"])]
    assert [s.name for s in catalog.services] == ["ratings"]  # HTTP routes only for HTTP

    stock = Snapshot.from_dict(compile_service(resources, ENDPOINTS, "stock").snapshot)
    assert stock.inbound.tcp == InboundTcp(idle_timeout=600.0)
    assert stock.inbound.authz is not None
    assert stock.inbound.authz.rules[0].source == "catalog"
    assert stock.tcp == ()  # no listener that would call itself
    ratings = Snapshot.from_dict(compile_service(resources, ENDPOINTS, "ratings").snapshot)
    assert ratings.inbound.tcp is None


@pytest.mark.parametrize(("extra", "message"), [
    ("kind: Service\nname: db\nspec: {protocol: tcp}",
     "Service/db: spec.port: required with protocol: tcp"),
    ("kind: Service\nname: db\nspec: {protocol: tcp, port: 16379}",
     "Service/stock: spec.port: 16379 is already the port of tcp Service/db"),
    ("kind: Service\nname: db\nspec: {protocol: tcp, port: 1, hosts: [db.local]}",
     "spec.hosts: a tcp Service has no Host header to match"),
    ("kind: Service\nname: web\nspec: {idle_timeout: 5}",
     "Service/web: spec.idle_timeout: only with protocol: tcp"),
    ("kind: Route\nname: stock\nspec: {service: stock, rules: [{}]}",
     "Route/stock: spec.service: Service 'stock' is protocol: tcp"),
    ("kind: Service\nname: db\nspec: {protocol: udp}", "'udp' is not one of http, tcp"),
])
def test_tcp_services_are_checked(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_set(as_set(TEXT + "---\n" + extra))
