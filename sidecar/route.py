"""Route matching and weighted subset choice, compiled once per snapshot."""

from __future__ import annotations

import bisect
import random
import re

from mesh.snapshot import Match, Route, StringMatch
from sidecar.cluster import ClusterState
from sidecar.http.codec import RequestHead


class _StrMatcher:
    __slots__ = ("exact", "prefix", "present", "regex")

    def __init__(self, m: StringMatch) -> None:
        self.exact = m.exact
        self.prefix = m.prefix
        self.regex = re.compile(m.regex) if m.regex is not None else None
        self.present = m.present

    def __call__(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return self.present


class Matcher:
    """A compiled `Match`: path, methods, headers and source service, all must hold."""

    def __init__(self, m: Match) -> None:
        self.path = _StrMatcher(m.path) if m.path is not None else None
        self.methods = frozenset(x.encode() for x in m.methods)
        self.headers = [(k.encode(), _StrMatcher(v)) for k, v in m.headers]
        self.source = m.source
        self.always = self.path is None and not self.methods and not self.headers \
            and self.source is None

    def __call__(self, head: RequestHead, source: str | None) -> bool:
        if self.always:
            return True
        if self.methods and head.method not in self.methods:
            return False
        if self.source is not None and source != self.source:
            return False
        if self.path is not None and not self.path(head.path):
            return False
        for name, check in self.headers:
            value = head.get(name)
            if not check(None if value is None else value.decode("latin-1")):
                return False
        return True


class CompiledRoute:
    def __init__(self, route: Route, cluster: ClusterState, rng: random.Random) -> None:
        self.route = route
        self.cluster = cluster
        self.matcher = Matcher(route.match)
        # How late the route timeout may fire (the proxy moves deadlines lazily): 5 % of
        # it, at most 250 ms.
        self.deadline_slack = min(0.25, route.timeout * 0.05)
        split = route.split or ((cluster.config.subsets[0][0], 1),)
        self.subsets = [name for name, w in split if w > 0]
        self._cumulative: list[int] = []
        total = 0
        for _, w in split:
            if w > 0:
                total += w
                self._cumulative.append(total)
        self._total = total
        self._rng = rng

    def pick_subset(self) -> str:
        if len(self.subsets) == 1:
            return self.subsets[0]
        x = self._rng.random() * self._total
        return self.subsets[bisect.bisect_right(self._cumulative, x)]


class Router:
    """Host header -> ordered routes; the first whose match holds wins."""

    def __init__(self) -> None:
        self.hosts: dict[str, list[CompiledRoute]] = {}
        # Host header bytes as received -> routes, for hosts that have routes (so the
        # cache is bounded by the snapshot, not by what clients send).
        self._seen: dict[bytes, list[CompiledRoute]] = {}

    def find(self, head: RequestHead, source: str | None) -> CompiledRoute | None:
        host = head.get(b"host")
        if host is None:
            return None
        routes = self._seen.get(host)
        if routes is None:
            name = host.decode("latin-1").lower()
            routes = self.hosts.get(name)
            if routes is None:
                # "reviews:9080" and "reviews" name the same service.
                routes = self.hosts.get(name.rsplit(":", 1)[0])
                if routes is None:
                    return None
            if len(self._seen) < 4 * len(self.hosts) + 64:
                self._seen[host] = routes
        for r in routes:
            if r.matcher(head, source):
                return r
        return None
