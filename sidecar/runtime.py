"""Everything built from one snapshot: router, cluster states, inbound policy.

A new Runtime is built off to the side and swapped in with one assignment, so a
request sees either the old or the new config, never a mix. Endpoint health, budgets
and breaker counters carry over by cluster name.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mesh.snapshot import (
    Cluster,
    Endpoint,
    Fault,
    Inbound,
    Match,
    Outlier,
    Route,
    Snapshot,
)
from sidecar.authz import Authorizer
from sidecar.cluster import ClusterState
from sidecar.http.codec import RequestHead
from sidecar.route import CompiledRoute, Matcher, Router

APP_CLUSTER = "inbound|app"
_ANY = Match()


class Runtime:
    def __init__(self, snapshot: Snapshot, app_port: int, rng: random.Random,
                 clock: Callable[[], float], previous: Runtime | None = None,
                 namespace: str | None = None) -> None:
        """`namespace`: the sidecar's own (from its SPIFFE ID; None without an identity),
        which scopes authorization rules that name a `source` but no `namespace`."""
        self.snapshot = snapshot
        self.namespace = namespace
        self.limits = snapshot.limits
        old = previous.clusters if previous is not None else {}
        self.clusters: dict[str, ClusterState] = {
            c.name: ClusterState(c, rng, clock, old.get(c.name)) for c in snapshot.clusters}
        self.router = Router()
        for svc in snapshot.services:
            compiled = [CompiledRoute(r, self.clusters[r.cluster], rng) for r in svc.routes]
            for host in svc.hosts:
                self.router.hosts[host] = compiled
        app = Cluster(name=APP_CLUSTER,
                      subsets=(("app", (Endpoint("127.0.0.1", app_port),)),),
                      # The local app is the only endpoint: never eject it.
                      outlier=Outlier(consecutive_5xx=2**31 - 1, max_ejection_percent=0))
        self.app_cluster = ClusterState(app, rng, clock, old.get(APP_CLUSTER))
        self.clusters[APP_CLUSTER] = self.app_cluster
        self.inbound: Inbound = snapshot.inbound
        self.inbound_route = CompiledRoute(
            Route(name="inbound", match=_ANY, cluster=APP_CLUSTER, split=(("app", 1),),
                  timeout=snapshot.inbound.timeout), self.app_cluster, rng)
        self.authz = Authorizer(snapshot.inbound.authz, namespace)
        self.inbound_faults = [(Matcher(f.match), f.fault) for f in snapshot.inbound.faults]

    def inbound_fault(self, head: RequestHead, source: str | None) -> Fault | None:
        for matcher, fault in self.inbound_faults:
            if matcher(head, source):
                return fault
        return None
