"""End to end with real processes: client -> sidecar (outbound) -> sidecar (inbound) -> app.

One topology per module (starting ~8 processes costs a second or two):
  reviews v1, v2      apps behind their own sidecars
  ratings             app behind a sidecar that injects a 5% abort (503) and, on /slow,
                      a 2 s delay
  bad                 an app that answers 500 to everything (reached directly)
  productpage         the client's sidecar, whose snapshot routes to all of the above
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sidecar_helpers import Procs, Sidecar, request, snapshot


class Mesh:
    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.v1 = procs.sidecar("reviews", "v1", procs.app("v1"), snapshot())
        self.v2 = procs.sidecar("reviews", "v2", procs.app("v2"), snapshot())
        self.ratings = procs.sidecar("ratings", "v1", procs.app("ratings"), snapshot(
            inbound={"faults": [
                {"match": {"path": {"prefix": "/slow"}},
                 "delay": {"percent": 100, "seconds": 2.0}},
                {"abort": {"percent": 5, "status": 503}},
            ]}))
        self.bad_app = procs.app("bad", fail=True)
        self.good_a = procs.app("good-a")
        self.good_b = procs.app("good-b")
        ep = "127.0.0.1:{}".format
        self.client = procs.sidecar("productpage", "v1", 1, snapshot(
            services=[
                {"name": "reviews", "routes": [
                    {"name": "jason", "match": {"headers": {"x-user": {"exact": "jason"}}},
                     "split": {"v2": 100}},
                    {"name": "canary", "split": {"v1": 95, "v2": 5}},
                ]},
                {"name": "ratings", "routes": [
                    {"name": "slow", "match": {"path": {"prefix": "/slow"}}, "timeout": 0.5},
                    {"name": "default", "retries": {
                        "attempts": 5, "on": ["connect-failure", "reset", 503],
                        "backoff": {"base": 0.001, "max": 0.01}}},
                ]},
                {"name": "ratings-noretry", "routes": [{"cluster": "ratings"}]},
                {"name": "flaky", "routes": [{"split": {"all": 1}}]},
                {"name": "down", "routes": [{"retries": {
                    "attempts": 2, "on": ["connect-failure"],
                    "backoff": {"base": 0.001, "max": 0.001}}}]},
                {"name": "faulty", "routes": [{"fault": {"abort": {"percent": 100,
                                                                   "status": 418}}}]},
                {"name": "narrow", "routes": [{}]},
                {"name": "quick", "routes": [{"cluster": "narrow", "timeout": 0.2}]},
                {"name": "sticky", "routes": [{}]},
                {"name": "p2c", "routes": [{}]},
                {"name": "pertry", "routes": [{"cluster": "ratings", "timeout": 5, "retries": {
                    "attempts": 2, "per_try_timeout": 0.3, "on": ["timeout"],
                    "backoff": {"base": 0.001, "max": 0.001}}}]},
                {"name": "nobudget", "routes": [{"retries": {
                    "attempts": 3, "on": ["connect-failure"]}}]},
                {"name": "failing", "routes": [{"retries": {
                    "attempts": 2, "on": [500], "backoff": {"base": 0.001, "max": 0.001}}}]},
            ],
            clusters=[
                {"name": "reviews", "subsets": {"v1": [ep(self.v1.inbound)],
                                                "v2": [ep(self.v2.inbound)]}},
                {"name": "ratings", "subsets": {"v1": [ep(self.ratings.inbound)]},
                 "retry_budget": {"ratio": 0.5, "min_per_second": 20}},
                {"name": "ratings-noretry", "subsets": {"v1": [ep(self.ratings.inbound)]}},
                {"name": "flaky", "subsets": {"all": [ep(self.good_a), ep(self.bad_app),
                                                      ep(self.good_b)]},
                 "outlier": {"consecutive_5xx": 3, "base_ejection_seconds": 60,
                             "max_ejection_percent": 34}},
                {"name": "down", "subsets": {"v1": [ep(_closed_port())]}},
                {"name": "faulty", "subsets": {"v1": [ep(self.good_a)]}},
                {"name": "sticky", "lb": "hash", "hash_header": "x-user",
                 "subsets": {"v1": [ep(self.good_a), ep(self.good_b)]}},
                {"name": "p2c", "lb": "least_request",
                 "subsets": {"v1": [ep(self.good_a), ep(self.good_b)]}},
                {"name": "narrow", "subsets": {"v1": [ep(self.good_a)]},
                 "circuit_breaker": {"max_requests": 1}},
                {"name": "nobudget", "subsets": {"v1": [ep(_closed_port())]},
                 "retry_budget": {"ratio": 0, "min_per_second": 0}},
                {"name": "failing", "subsets": {"v1": [ep(self.bad_app)]}},
            ]))


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now: connects are refused
    return port


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    procs = Procs(Path(tmp_path_factory.mktemp("mesh")))
    try:
        yield Mesh(procs)
    finally:
        procs.close()


def _many(port: int, n: int, host: str, path: str = "/anything",
          headers: dict[str, str] | None = None) -> list[tuple[int, dict[str, str], bytes]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return [request(port, path, host=host, headers=headers, conn=conn) for _ in range(n)]
    finally:
        conn.close()


def _within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return abs(observed - mean) <= sigmas * sd


def test_weighted_split_95_5(mesh: Mesh) -> None:
    n = 2000
    results = _many(mesh.client.outbound, n, "reviews")
    assert all(s == 200 for s, _, _ in results)
    counts = Counter(h["x-app"] for _, h, _ in results)
    assert set(counts) == {"v1", "v2"}
    assert _within(counts["v2"], n, 0.05), counts


def test_header_routes_to_v2(mesh: Mesh) -> None:
    results = _many(mesh.client.outbound, 50, "reviews", headers={"x-user": "jason"})
    assert {h["x-app"] for _, h, _ in results} == {"v2"}
    other = _many(mesh.client.outbound, 50, "reviews", headers={"x-user": "mallory"})
    assert "v1" in {h["x-app"] for _, h, _ in other}


def test_source_and_request_id_reach_the_app(mesh: Mesh) -> None:
    _, _, body = request(mesh.client.outbound, "/anything", host="reviews:9080",
                         headers={"x-request-id": "keep-me", "x-mesh-source": "spoofed"})
    seen = json.loads(body)["headers"]
    assert json.loads(body)["header_names"].count("x-mesh-source") == 1
    assert seen["x-request-id"] == "keep-me"
    assert seen["x-mesh-source"] == "productpage"
    _, _, body = request(mesh.client.outbound, "/anything", host="reviews")
    seen = json.loads(body)["headers"]
    generated = seen["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    # A request that starts a trace is named by it: one id finds its log lines and spans.
    assert seen["traceparent"].split("-")[1] == generated
    # Within a trace the app started, each request still gets an id of its own.
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    ids = set()
    for _ in range(3):
        _, _, body = request(mesh.client.outbound, "/anything", host="reviews",
                             headers={"traceparent": parent})
        seen = json.loads(body)["headers"]
        assert seen["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
        ids.add(seen["x-request-id"])
    assert len(ids) == 3 and "4bf92f3577b34da6a3ce929d0e0e4736" not in ids


def test_abort_fault_masked_by_client_retries(mesh: Mesh) -> None:
    n = 1000
    results = _many(mesh.client.outbound, n, "ratings")
    assert Counter(s for s, _, _ in results) == {200: n}
    # The retries were real: the client sidecar counted them.
    _status, metrics = mesh.client.admin_get("/metrics")
    retries = _metric(metrics, "mesh_sidecar_retries_total")
    assert retries > 0 and _within(int(retries), n, 0.05 / 0.95, sigmas=6)


def test_abort_fault_visible_without_retries(mesh: Mesh) -> None:
    n = 1000
    results = _many(mesh.client.outbound, n, "ratings-noretry")
    failed = [h for s, h, _ in results if s != 200]
    assert _within(len(failed), n, 0.05), len(failed)
    assert all(h["x-mesh-flags"] == "FI" for h in failed)
    assert {s for s, _, _ in results} == {200, 503}


def test_injected_delay_trips_the_timeout(mesh: Mesh) -> None:
    status, headers, body = request(mesh.client.outbound, "/slow", host="ratings")
    assert status == 504
    assert headers["x-mesh-flags"] == "UT"
    assert "timeout" in headers["x-mesh-reason"]
    assert b"[UT]" in body


def test_failing_endpoint_is_ejected(mesh: Mesh) -> None:
    results = _many(mesh.client.outbound, 60, "flaky")
    statuses = [s for s, _, _ in results]
    assert statuses.count(500) == 3  # exactly the consecutive_5xx threshold
    assert 500 not in statuses[20:]
    assert {h["x-app"] for s, h, _ in results[20:]} == {"good-a", "good-b"}
    ejected = mesh.client.config_dump()["ejected"]["flaky"]
    assert ejected == [f"127.0.0.1:{mesh.bad_app}"]


def test_connect_failure_flags(mesh: Mesh) -> None:
    status, headers, _ = request(mesh.client.outbound, "/", host="down")
    assert status == 503
    assert headers["x-mesh-flags"] == "UF,URX"


def test_client_side_fault_and_no_route(mesh: Mesh) -> None:
    status, headers, _ = request(mesh.client.outbound, "/", host="faulty")
    assert (status, headers["x-mesh-flags"]) == (418, "FI")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.client.outbound, timeout=5)
    try:
        status, headers, _ = request(mesh.client.outbound, "/", host="unknown", conn=conn)
        assert (status, headers["x-mesh-flags"]) == (404, "NR")
        assert "unknown" in headers["x-mesh-reason"]
        sock = conn.sock
        # The local reply kept the connection usable.
        assert request(mesh.client.outbound, "/anything", host="reviews", conn=conn)[0] == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_hash_and_least_request_balancing(mesh: Mesh) -> None:
    port = mesh.client.outbound
    placement = {}
    for user in range(20):
        apps = {h["x-app"] for _, h, _ in _many(port, 5, "sticky",
                                                  headers={"x-user": f"user-{user}"})}
        assert len(apps) == 1  # one user, one endpoint
        placement[user] = apps.pop()
    assert set(placement.values()) == {"good-a", "good-b"}
    apps = Counter(h["x-app"] for _, h, _ in _many(port, 100, "p2c"))
    assert set(apps) == {"good-a", "good-b"}


def test_keep_alive_outlives_a_short_route_timeout(mesh: Mesh) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.client.outbound, timeout=5)
    try:
        assert request(mesh.client.outbound, "/anything", host="quick", conn=conn)[0] == 200
        sock = conn.sock
        time.sleep(0.5)  # idle past the 0.2 s route timeout, within the idle timeout
        assert request(mesh.client.outbound, "/anything", host="quick", conn=conn)[0] == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_circuit_breaker_overflow(mesh: Mesh) -> None:
    port = mesh.client.outbound
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"GET /delay/1 HTTP/1.1\r\nhost: narrow\r\n\r\n")
        deadline = time.monotonic() + 0.9
        seen = None
        while time.monotonic() < deadline:  # until the slow request holds the only slot
            status, headers, _ = request(port, "/anything", host="narrow")
            if status == 503:
                seen = headers
                break
        assert seen is not None and seen["x-mesh-flags"] == "UO"
        assert "max_requests" in seen["x-mesh-reason"]
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    assert request(port, "/anything", host="narrow")[0] == 200


def test_per_try_timeout_is_retried_then_flagged(mesh: Mesh) -> None:
    t0 = time.monotonic()
    status, headers, _ = request(mesh.client.outbound, "/slow", host="pertry")
    assert (status, headers["x-mesh-flags"]) == (504, "UT,URX")
    # Two tries of 0.3 s, not the 5 s overall timeout (generous: CI machines are slow).
    assert 0.5 < time.monotonic() - t0 < 4.5


def test_retry_budget_exhausted(mesh: Mesh) -> None:
    status, headers, _ = request(mesh.client.outbound, "/", host="nobudget")
    assert (status, headers["x-mesh-flags"]) == (503, "UF,URX")
    assert "retry budget exhausted" in headers["x-mesh-reason"]


def test_forwarded_5xx_after_the_last_retry_is_flagged_urx(mesh: Mesh) -> None:
    retries = _metric(mesh.client.admin_get("/metrics")[1], "mesh_sidecar_retries_total")
    status, headers, body = request(mesh.client.outbound, "/anything", host="failing")
    # The app's own 500 (its body and headers), marked as what the last retry got.
    assert (status, headers["x-app"], headers["x-mesh-flags"]) == (500, "bad", "URX")
    assert json.loads(body)["name"] == "bad"
    assert _metric(mesh.client.admin_get("/metrics")[1], "mesh_sidecar_retries_total") \
        == retries + 1


def _metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def test_admin_endpoints(mesh: Mesh) -> None:
    s: Sidecar = mesh.client
    assert s.admin_get("/healthz") == (200, b"ok\n")
    assert s.admin_get("/ready")[0] == 200
    dump = s.config_dump()
    assert dump["service"] == "productpage"
    assert dump["snapshot"]["version"] == "1"
    assert s.admin_get("/nope")[0] == 404
