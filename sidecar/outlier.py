"""Passive outlier detection: consecutive gateway errors eject an endpoint. Pure.

An ejected endpoint comes back after `base * times_ejected` seconds (capped), so a
flapping endpoint stays out longer each time. At most `max_ejection_percent` of a
cluster's endpoints are out at once, so detection can never empty a cluster.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh.snapshot import Endpoint, Outlier


class EndpointHealth:
    __slots__ = ("active", "consecutive", "ejected_until", "times_ejected")

    def __init__(self) -> None:
        self.active = 0  # requests in flight, for least-request balancing
        self.consecutive = 0
        self.ejected_until = 0.0
        self.times_ejected = 0


class OutlierDetector:
    def __init__(self, config: Outlier, endpoints: list[Endpoint],
                 clock: Callable[[], float],
                 previous: OutlierDetector | None = None) -> None:
        self.config = config
        self._clock = clock
        self.health: dict[Endpoint, EndpointHealth] = {}
        for ep in endpoints:
            old = previous.health.get(ep) if previous is not None else None
            self.health[ep] = old if old is not None else EndpointHealth()
        # Carried over: pick() skips the ejection filter while this is 0, and the
        # carried-over health keeps its ejected_until (a reload must not readmit them).
        self.ejections: int = previous.ejections if previous is not None else 0

    def is_ejected(self, ep: Endpoint, now: float) -> bool:
        return self.health[ep].ejected_until > now

    def ejected_count(self, now: float) -> int:
        return sum(1 for h in self.health.values() if h.ejected_until > now)

    def on_success(self, ep: Endpoint) -> None:
        self.health[ep].consecutive = 0

    def on_failure(self, ep: Endpoint) -> bool:
        """Record a 5xx/connect failure/reset; return True if the endpoint was ejected."""
        h = self.health[ep]
        h.consecutive += 1
        c = self.config
        if h.consecutive < c.consecutive_5xx:
            return False
        now = self._clock()
        if h.ejected_until > now:
            return False
        limit = len(self.health) * c.max_ejection_percent // 100
        if self.ejected_count(now) >= limit:
            return False
        h.times_ejected += 1
        h.consecutive = 0
        h.ejected_until = now + min(c.max_ejection_seconds,
                                    c.base_ejection_seconds * h.times_ejected)
        self.ejections += 1
        return True
