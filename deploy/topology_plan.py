"""Turn a topology into a plan: every process to start, its ports, and each sidecar's snapshot.

Pure: ports come from the `allocate` function given, so tests can plan without
sockets. Until sidecars take their config from the control plane, a topology
sidecar gets a static snapshot file compiled here: one cluster per called
service, one subset per version listing the inbound listeners of that
version's sidecars, and a default route with the topology's split, a timeout
and retries (what a user of Istio or Linkerd gets without writing policy).
Opaque TCP services have sidecars too (their inbound listener splices to the app,
after mTLS and authorization when identities are on); a caller reaches them through a
TCP listener on its own sidecar, on a port allocated per caller instance (`tcp_ports`,
passed as `--tcp-port NAME=PORT`, since callers share this host). With a control plane
the listener comes from the `protocol: tcp` Service (docs/resources.md) and replaces
the file's one of the same name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deploy.topology import Topology

HOST = "127.0.0.1"
INGRESS = "ingress"
TCP_SERVICE_PORT_BASE = 16379  # the tcp Services' nominal ports (callers get --tcp-port)

DEFAULT_ROUTE_POLICY: dict[str, Any] = {
    "timeout": 10.0,
    "retries": {
        "attempts": 3,
        "per_try_timeout": 4.0,
        "on": ["connect-failure", "reset", 502, 503],
    },
}


@dataclass
class Instance:
    service: str
    version: str
    name: str  # e.g. catalog-v2-1
    protocol: str
    app_port: int
    app_argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Sidecar (None ports mean "no sidecar").
    inbound_port: int | None = None
    outbound_port: int | None = None
    admin_port: int | None = None
    tcp_ports: dict[str, int] = field(default_factory=dict)
    snapshot: dict[str, Any] | None = None

    @property
    def has_app(self) -> bool:
        return bool(self.app_argv)


@dataclass
class Plan:
    topology: Topology
    instances: list[Instance]

    def by_service(self, service: str) -> list[Instance]:
        return [i for i in self.instances if i.service == service]

    @property
    def ingress(self) -> Instance | None:
        found = self.by_service(INGRESS)
        return found[0] if found else None


def _expand(argv: tuple[str, ...], inst: Instance) -> list[str]:
    values = {
        "{port}": str(inst.app_port),
        "{version}": inst.version,
        "{service}": inst.service,
        "{instance}": inst.name,
        "{python}": sys.executable,
    }
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace(key, value)
        out.append(arg)
    return out


def make_plan(
    topology: Topology, allocate: Callable[[], int], ingress_port: int | None = None
) -> Plan:
    instances: list[Instance] = []
    for svc in topology.services:
        for version, replicas in svc.versions:
            for n in range(1, replicas + 1):
                inst = Instance(
                    svc.name, version, f"{svc.name}-{version}-{n}", svc.protocol, allocate(), []
                )
                inst.app_argv = _expand(svc.app, inst)
                inst.inbound_port, inst.outbound_port, inst.admin_port = (
                    allocate(),
                    allocate(),
                    allocate(),
                )
                if svc.protocol == "http":
                    inst.env["MESH_OUTBOUND"] = f"{HOST}:{inst.outbound_port}"
                    for callee in svc.calls:
                        if topology.service(callee).protocol == "tcp":
                            inst.tcp_ports[callee] = allocate()
                            inst.env[f"{callee.upper().replace('-', '_')}_ADDR"] = (
                                f"{HOST}:{inst.tcp_ports[callee]}"
                            )
                instances.append(inst)
    if topology.ingress is not None:
        port = topology.ingress.port if ingress_port is None else ingress_port
        instances.append(
            Instance(
                INGRESS,
                "v1",
                "ingress",
                "http",
                allocate(),  # the sidecar needs an app port; the ingress has no app behind it
                [],
                inbound_port=allocate(),
                outbound_port=port or allocate(),
                admin_port=allocate(),
            )
        )
    plan = Plan(topology, instances)
    for inst in instances:
        inst.snapshot = sidecar_snapshot(plan, inst)
    return plan


def sidecar_snapshot(plan: Plan, inst: Instance) -> dict[str, Any]:
    topo = plan.topology
    if inst.service == INGRESS:
        assert topo.ingress is not None
        calls: tuple[str, ...] = (topo.ingress.service,)
        extra_hosts = {topo.ingress.service: ["localhost", HOST]}
    else:
        calls = topo.service(inst.service).calls
        extra_hosts = {}
    services: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    tcp: list[dict[str, Any]] = []
    for callee in calls:
        spec = topo.service(callee)
        targets = plan.by_service(callee)
        if spec.protocol == "tcp":
            # To the callee's sidecars (not its apps): they terminate mTLS and authorize.
            clusters.append(
                {"name": callee, "subsets": {"all": [f"{HOST}:{t.inbound_port}" for t in targets]}}
            )
            tcp.append(
                {"name": callee, "port": inst.tcp_ports[callee], "cluster": callee, "subset": "all"}
            )
            continue
        subsets = {
            v: [f"{HOST}:{t.inbound_port}" for t in targets if t.version == v]
            for v, _ in spec.versions
        }
        clusters.append({"name": callee, "lb": "least_request", "subsets": subsets})
        services.append(
            {
                "name": callee,
                "hosts": [callee, *extra_hosts.get(callee, [])],
                "routes": [{"name": "default", "split": dict(spec.split), **DEFAULT_ROUTE_POLICY}],
            }
        )
    snapshot: dict[str, Any] = {
        "version": f"topology-{topo.name}-1",
        "service": inst.service,
        "services": services,
        "clusters": clusters,
        "tcp": tcp,
    }
    if inst.protocol == "tcp":
        snapshot["inbound"] = {"tcp": {}}
    return snapshot


def topology_resources(topology: Topology) -> list[dict[str, Any]]:
    """The topology's services as control-plane resources (docs/resources.md): for HTTP a
    Service, a DestinationPolicy with one subset per version, and a Route with the topology's
    split, timeout and retries; for opaque TCP a `protocol: tcp` Service (its `port` is only a
    default: each caller sidecar gets its own with `--tcp-port`) and a DestinationPolicy."""
    http = [s for s in topology.services if s.protocol == "http"]
    docs: list[dict[str, Any]] = []
    for i, svc in enumerate(s for s in topology.services if s.protocol == "tcp"):
        docs.append(
            {
                "kind": "Service",
                "name": svc.name,
                # Distinct per tcp Service (the check wants it); callers override it.
                "spec": {"protocol": "tcp", "port": TCP_SERVICE_PORT_BASE + i},
            }
        )
        docs.append(
            {
                "kind": "DestinationPolicy",
                "name": svc.name,
                "spec": {"service": svc.name, "lb": "least_request", "mtls": topology.mtls.lower()},
            }
        )
    for svc in http:
        hosts = (
            [HOST, "localhost"] if topology.ingress and topology.ingress.service == svc.name else []
        )
        docs.append(
            {
                "kind": "Service",
                "name": svc.name,
                "spec": {
                    "protocol": "http",
                    "hosts": hosts,
                    "dependencies": list(svc.calls),
                },
            }
        )
        docs.append(
            {
                "kind": "DestinationPolicy",
                "name": svc.name,
                "spec": {
                    "service": svc.name,
                    "lb": "least_request",
                    "subsets": {v: {"version": v} for v, _ in svc.versions},
                    # The topology's mode, so the control plane's snapshots keep it.
                    "mtls": topology.mtls.lower(),
                },
            }
        )
        docs.append(
            {
                "kind": "Route",
                "name": svc.name,
                "spec": {
                    "service": svc.name,
                    "rules": [
                        {"name": "default", "split": dict(svc.split), **DEFAULT_ROUTE_POLICY}
                    ],
                },
            }
        )
    if topology.ingress is not None:
        docs.append(
            {
                "kind": "Service",
                "name": INGRESS,
                "spec": {"protocol": "http", "dependencies": [topology.ingress.service]},
            }
        )
    return docs
