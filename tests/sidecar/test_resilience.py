"""Pure cores: retry budget, backoff, outlier ejection, endpoint pickers, route matching."""

from __future__ import annotations

import random
from collections import Counter

from mesh.snapshot import Backoff, Endpoint, Outlier, RetryBudget, Snapshot
from sidecar.balance import Picker
from sidecar.budget import Budget, backoff_delay
from sidecar.http.codec import HEAD, RequestHead, RequestReader
from sidecar.outlier import EndpointHealth, OutlierDetector
from sidecar.runtime import Runtime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_budget_caps_retries_at_ratio_plus_minimum() -> None:
    clock = Clock()
    budget = Budget(RetryBudget(ratio=0.2, min_per_second=1, window_seconds=10), clock)
    for _ in range(100):
        budget.on_request()
    allowed = sum(budget.try_retry() for _ in range(100))
    assert allowed == 10 + 20  # min 1/s over 10 s, plus 20% of 100 requests
    clock.now += 11  # the window slides: old requests and retries are forgotten
    assert sum(budget.try_retry() for _ in range(100)) == 10


def test_backoff_is_jittered_and_capped() -> None:
    rng = random.Random(1)
    policy = Backoff(base=0.1, max=0.5)
    delays = [backoff_delay(policy, attempt, rng) for attempt in range(10) for _ in range(50)]
    assert all(0 <= d <= 0.5 for d in delays)
    assert len(set(delays)) > 100
    assert max(backoff_delay(policy, 0, rng) for _ in range(100)) <= 0.1


def test_outlier_ejects_for_growing_time_within_max_percent() -> None:
    clock = Clock()
    eps = [Endpoint("h", p) for p in range(4)]
    od = OutlierDetector(Outlier(consecutive_5xx=2, base_ejection_seconds=10,
                                 max_ejection_seconds=25, max_ejection_percent=50), eps, clock)
    assert not od.on_failure(eps[0])
    od.on_success(eps[0])
    assert not od.on_failure(eps[0])  # the success reset the count
    assert od.on_failure(eps[0])
    assert od.is_ejected(eps[0], clock.now)
    assert od.health[eps[0]].ejected_until == clock.now + 10
    for _ in range(2):
        od.on_failure(eps[1])
    assert od.is_ejected(eps[1], clock.now)
    for _ in range(4):  # 2 of 4 ejected already: 50% is the ceiling
        assert not od.on_failure(eps[2])
    clock.now += 10.5
    assert not od.is_ejected(eps[0], clock.now)
    od.on_failure(eps[0])
    assert od.on_failure(eps[0])
    assert od.health[eps[0]].ejected_until == clock.now + 20  # second time: twice as long
    od.health[eps[0]].ejected_until = 0
    od.on_failure(eps[0])
    od.on_failure(eps[0])
    assert od.health[eps[0]].ejected_until == clock.now + 25  # capped


def test_pickers() -> None:
    rng = random.Random(3)
    eps = [Endpoint("h", p) for p in range(1, 5)]
    health = {e: EndpointHealth() for e in eps}
    rr = Picker("round_robin", rng)
    assert Counter(rr.pick(eps, health, None) for _ in range(400)) == {e: 100 for e in eps}
    lr = Picker("least_request", rng)
    health[eps[0]].active = 50
    assert eps[0] not in {lr.pick(eps, health, None) for _ in range(200)}
    h = Picker("hash", rng)
    keys = [b"user-%d" % i for i in range(200)]
    before = {k: h.pick(eps, health, k) for k in keys}
    assert before == {k: h.pick(eps, health, k) for k in keys}  # stable
    after = {k: h.pick(eps[:3], health, k) for k in keys}  # one endpoint leaves
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == eps[3] for k in moved)  # only its keys move
    assert rr.pick([], health, None) is None


def _head(raw: bytes) -> RequestHead:
    r = RequestReader()
    r.feed(raw)
    kind, head = r.events[0]
    assert kind == HEAD and isinstance(head, RequestHead)
    return head


def test_route_matching_and_weights() -> None:
    snap = Snapshot.from_dict({
        "version": "1",
        "services": [{"name": "reviews", "routes": [
            {"name": "by-header", "match": {"headers": {"x-user": {"prefix": "ja"}}},
             "split": {"v2": 1}},
            {"name": "by-source", "match": {"source": "admin", "methods": ["DELETE"]},
             "split": {"v3": 1}},
            {"name": "by-path", "match": {"path": {"regex": "/api/v[0-9]+/.*"}},
             "split": {"v3": 1}},
            {"name": "canary", "split": {"v1": 90, "v2": 10}},
        ]}],
        "clusters": [{"name": "reviews", "subsets": {"v1": [], "v2": [], "v3": []}}],
    })
    rt = Runtime(snap, 9080, random.Random(5), Clock())

    def route(raw: bytes, source: str | None = None) -> str | None:
        r = rt.router.find(_head(raw), source)
        return r.route.name if r else None

    assert route(b"GET / HTTP/1.1\r\nHost: Reviews:9080\r\nX-User: jason\r\n\r\n") == "by-header"
    assert route(b"DELETE /x HTTP/1.1\r\nhost: reviews\r\n\r\n", "admin") == "by-source"
    assert route(b"DELETE /x HTTP/1.1\r\nhost: reviews\r\n\r\n", "web") == "canary"
    assert route(b"GET /api/v2/x?q=1 HTTP/1.1\r\nhost: reviews\r\n\r\n") == "by-path"
    assert route(b"GET /api/vX/x HTTP/1.1\r\nhost: reviews\r\n\r\n") == "canary"
    assert route(b"GET / HTTP/1.1\r\nhost: ratings\r\n\r\n") is None
    assert route(b"GET / HTTP/1.0\r\n\r\n") is None
    canary = rt.router.hosts["reviews"][3]
    picks = Counter(canary.pick_subset() for _ in range(10000))
    assert set(picks) == {"v1", "v2"} and 850 < picks["v2"] < 1150


def test_an_ejected_endpoint_stays_out_across_a_reload() -> None:
    from mesh.snapshot import Cluster
    from sidecar.cluster import ClusterState

    clock = Clock()
    eps = (Endpoint("h", 1), Endpoint("h", 2))
    config = Cluster(name="c", subsets=(("v1", eps),),
                     outlier=Outlier(consecutive_5xx=1, base_ejection_seconds=30, max_ejection_percent=50))
    before = ClusterState(config, random.Random(1), clock)
    assert before.outlier.on_failure(eps[0])
    assert {before.pick("v1", None) for _ in range(20)} == {eps[1]}
    after = ClusterState(config, random.Random(1), clock, previous=before)  # a snapshot reload
    assert {after.pick("v1", None) for _ in range(20)} == {eps[1]}
    clock.now += 31
    assert {after.pick("v1", None) for _ in range(20)} == set(eps)
