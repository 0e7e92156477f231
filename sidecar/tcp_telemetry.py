"""Opaque TCP telemetry of one sidecar: connections and bytes per (source, destination,
destination version), for `/metrics` and for the 1 s batch (docs/telemetry.md).

The path pays one dict lookup per *connection* (`open`), never per chunk: the splice
adds chunk sizes to the connection's `ByteCount`s, which this recorder reads when it
is asked (a scrape, a batch cut). A long-lived connection therefore shows its bytes
in every batch while it runs, not only when it closes.

Two reporters, as Istio's `reporter` label: the caller's sidecar reports `source`
(it knows the destination and version it picked), the destination's inbound TCP
listener reports `destination` (it knows the verified caller). Both appear in
`/metrics`; batches carry the source's view plus the destination's refusals (a
caller only sees a connection that closed), so the mesh counts each connection once.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.stats import TcpAgg
from mesh.telemetry import PairKey
from sidecar.splice import ByteCount

REPORTERS = ("source", "destination")


class TcpConn:
    """One proxied connection: its pair and its byte counters (sent: source -> dest)."""

    __slots__ = ("pair", "received", "sent")

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.sent = ByteCount()
        self.received = ByteCount()


class _Pair:
    __slots__ = ("closed", "denied", "live", "opened", "received", "sent")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.denied = 0
        self.sent = 0  # bytes of closed connections (live ones are read from `live`)
        self.received = 0
        self.live: set[TcpConn] = set()

    def totals(self) -> TcpAgg:
        sent, received = self.sent, self.received
        for c in self.live:
            sent += c.sent.n
            received += c.received.n
        return TcpAgg(self.opened, self.closed, sent, received, self.denied)


class TcpRecorder:
    """Cumulative TCP counts per (reporter, src, dst, version). Not thread-safe; no I/O."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str, str, str], _Pair] = {}
        self._reported: dict[PairKey, TcpAgg] = {}  # what batches have carried so far

    def _pair(self, reporter: str, src: str, dst: str, ver: str) -> _Pair:
        key = (reporter, src, dst, ver)
        pair = self.pairs.get(key)
        if pair is None:
            pair = self.pairs[key] = _Pair()
        return pair

    def open(self, reporter: str, src: str, dst: str, ver: str) -> TcpConn:
        pair = self._pair(reporter, src, dst, ver)
        pair.opened += 1
        conn = TcpConn(pair)
        pair.live.add(conn)
        return conn

    def close(self, conn: TcpConn) -> None:
        pair = conn.pair
        if conn in pair.live:
            pair.live.discard(conn)
            pair.closed += 1
            pair.sent += conn.sent.n
            pair.received += conn.received.n

    def add(self, reporter: str, src: str, dst: str, ver: str, *, opened: int = 0,
            closed: int = 0, sent: int = 0, received: int = 0) -> None:
        """Counts of a connection proxied without a splice (no live byte counters)."""
        pair = self._pair(reporter, src, dst, ver)
        pair.opened += opened
        pair.closed += closed
        pair.sent += sent
        pair.received += received

    def deny(self, reporter: str, src: str, dst: str, ver: str) -> None:
        self._pair(reporter, src, dst, ver).denied += 1

    def totals(self) -> dict[tuple[str, str, str, str], TcpAgg]:
        return {k: p.totals() for k, p in self.pairs.items()}

    def take(self) -> dict[PairKey, TcpAgg]:
        """What the mesh should count since the last call (for the batch): the source's
        view, and refusals seen by the destination; pairs with nothing new are left out."""
        current: dict[PairKey, TcpAgg] = {}
        for (reporter, src, dst, ver), pair in self.pairs.items():
            t = pair.totals()
            if reporter != "source":
                t = TcpAgg(denied=t.denied)
            agg = current.get((src, dst, ver))
            if agg is None:
                current[(src, dst, ver)] = t
            else:
                agg.merge(t)
        out: dict[PairKey, TcpAgg] = {}
        for key, now in current.items():
            before = self._reported.get(key)
            delta = TcpAgg(*now.as_tuple())
            if before is not None:
                delta.subtract(before)
            if delta:
                out[key] = delta
            self._reported[key] = now
        return out


_FAMILIES = (
    ("mesh_tcp_connections_opened", "opaque TCP connections opened"),
    ("mesh_tcp_connections_closed", "opaque TCP connections closed"),
    ("mesh_tcp_sent_bytes", "TCP bytes sent by the source to the destination"),
    ("mesh_tcp_received_bytes", "TCP bytes received by the source from the destination"),
    ("mesh_tcp_connections_denied", "TCP connections refused by authorization policy"),
)


class TcpCollector(Collector):
    """`/metrics` families, read at scrape time. Labels come from mesh configuration
    (service names, versions), verified identities' service accounts, or `unknown`."""

    def __init__(self, recorder: TcpRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterator[Metric]:
        labels = ["reporter", "source_service", "destination_service", "destination_version"]
        families = [CounterMetricFamily(n, t, labels=labels) for n, t in _FAMILIES]
        for key, agg in sorted(self.recorder.totals().items()):
            for family, n in zip(families, agg.as_tuple(), strict=True):
                family.add_metric(list(key), n)
        yield from families
