"""Per-cluster runtime state: endpoints per subset, picker, outlier detector, budget,
circuit-breaker counters. Rebuilt on every snapshot, carrying health over."""

from __future__ import annotations

import random
from collections.abc import Callable

import trio

from mesh.snapshot import Cluster, Endpoint
from sidecar.balance import Picker
from sidecar.budget import Budget
from sidecar.outlier import OutlierDetector


class ClusterState:
    def __init__(self, config: Cluster, rng: random.Random, clock: Callable[[], float],
                 previous: ClusterState | None = None) -> None:
        self.config = config
        self.subsets: dict[str, list[Endpoint]] = {n: list(eps) for n, eps in config.subsets}
        endpoints = sorted({e for eps in self.subsets.values() for e in eps},
                           key=lambda e: (e.host, e.port))
        self.outlier: OutlierDetector = OutlierDetector(config.outlier, endpoints, clock,
                                       previous.outlier if previous else None)
        self.health = self.outlier.health
        same_budget = previous is not None and previous.config.retry_budget == config.retry_budget
        self.budget: Budget = previous.budget if previous and same_budget else Budget(
            config.retry_budget, clock)
        self.picker = Picker(config.lb, rng)
        self.hash_header = config.hash_header.lower().encode() if config.hash_header else None
        # Circuit-breaker counters; shared with the previous state so that limits hold
        # across a reload while old requests finish.
        self.breaker: BreakerState = previous.breaker if previous is not None else BreakerState()
        self._clock = clock

    def pick(self, subset: str, key: bytes | None) -> Endpoint | None:
        eps = self.subsets[subset]
        if self.outlier.ejections:
            now = self._clock()
            eps = [e for e in eps if self.health[e].ejected_until <= now]
        return self.picker.pick(eps, self.health, key)


class BreakerState:
    """Counters for max_requests / max_connections / max_pending."""

    def __init__(self) -> None:
        self.active_requests = 0
        self.open_connections = 0
        self.pending = 0
        self.released = trio.lowlevel.ParkingLot()
