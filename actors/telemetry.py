"""The telemetry aggregator actor: sidecar batches in, golden signals and the graph out.

- subscribes to ``mesh.telemetry.>`` with no queue group: every replica merges
  every batch (deduplicated by instance, epoch and seq, mesh/stats_graph.py), so
  any replica can answer and a failover neither loses nor double counts;
- publishes each edge's golden signals every second on ``mesh.golden.<src>.<dst>``;
- answers ``mesh.graph.query`` (queue group: one replica answers) with the graph;
- keeps recent spans from ``mesh.spans.>`` and answers ``mesh.trace.query``;
- serves mesh-wide Prometheus metrics on an HTTP port (``/metrics``).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from actors.httpserve import Request, Response, bind, bound_port, serve
from actors.runtime import ActorContext
from bus import subjects
from bus.client import Bus
from bus.subscription import Overflow
from mesh.errors import BusError, ConfigError, MeshError
from mesh.messages import (
    GoldenSummary,
    GraphQuery,
    GraphReply,
    SpanRecord,
    TraceQuery,
    TraceReply,
)
from mesh.stats_graph import GraphState
from mesh.stats_window import WINDOWS
from mesh.telemetry import BadBatch, ParsedBatch, Row, parse_batch

log = logging.getLogger("mesh.actors.telemetry")

DEFAULT_METRICS_PORT = 9464
_REPLIES = subjects.graph_replies("x")[: -len("x")]
MAX_TRACES = 10_000
MAX_SPANS_PER_TRACE = 256


def span_dict(s: SpanRecord) -> dict[str, Any]:
    return {
        "trace_id": s.trace_id,
        "span_id": s.span_id,
        "parent_id": s.parent_id,
        "name": s.name,
        "service": s.service,
        "start_ns": s.start_ns,
        "end_ns": s.end_ns,
        "attrs": s.attrs,
        "error": s.error,
    }


def from_sender(subject: str, batch: ParsedBatch) -> bool:
    """A batch counts only if it is what its subject says and reports only its own edges.

    NATS lets a sidecar's user publish on mesh.telemetry.<ns>.<its service>.<instance>
    only (bus/auth.py), so the subject is vouched for; the body is what the sender claims.
    A batch whose body names another sidecar, or a row where the sender's service is
    neither the source nor the destination (a sidecar counts its outbound requests as
    source and, for callers outside the mesh or refused connections, its inbound ones as
    destination), would let one service falsify another's golden signals."""
    # Token by token: a dot inside a body field must not line up with the subject's tokens.
    if subject.split(".") != [subjects.PREFIX, "telemetry", batch.ns, batch.svc, batch.inst]:
        return False
    return all(_own_row(batch.svc, row) for row in batch.rows)


def _own_row(svc: str, row: Row) -> bool:
    """What a sidecar of `svc` reports: its calls (it is the source), and as destination
    only what no source sidecar reports: HTTP from callers outside the mesh (source
    "unknown") and TCP connections it refused. Anything else on an edge into `svc` would
    let it overwrite its callers' record of it (say, their errors)."""
    src, dst = row.key[0], row.key[1]
    if src == svc:
        return True
    if dst != svc:
        return False
    if src == UNKNOWN_SOURCE:
        return True
    return (row.n == 0 and row.err == 0 and not row.lat and row.rx == 0 and row.tx == 0
            and row.retries == 0 and row.tcp is not None and not any(row.tcp[:4]))


UNKNOWN_SOURCE = "unknown"  # sidecar/proxy.py: the source of a caller outside the mesh


def _span_subject(span: SpanRecord) -> str | None:
    try:
        return subjects.spans(span.service)
    except ConfigError:
        return None


class SpanStore:
    """The last MAX_TRACES traces' spans, oldest trace evicted first."""

    def __init__(self, max_traces: int = MAX_TRACES) -> None:
        self.max_traces = max_traces
        self.traces: dict[str, list[dict[str, Any]]] = {}

    def add(self, span: SpanRecord) -> None:
        spans = self.traces.get(span.trace_id)
        if spans is None:
            if len(self.traces) >= self.max_traces:
                del self.traces[next(iter(self.traces))]
            spans = self.traces[span.trace_id] = []
        # Deduplicated per (service, span id), not span id alone: a callee learns its
        # caller's span id from traceparent and could otherwise ship it first and have the
        # caller's real span dropped. (_spans only keeps a span that came on its own
        # service's subject.)
        if len(spans) < MAX_SPANS_PER_TRACE and all(
            x["span_id"] != span.span_id or x["service"] != span.service for x in spans
        ):
            spans.append(span_dict(span))

    def get(self, trace_id: str) -> list[dict[str, Any]]:
        return sorted(self.traces.get(trace_id.lower(), []), key=lambda s: s["start_ns"])


class MeshCollector(Collector):
    def __init__(self, state: GraphState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        st = self.state
        now = trio.current_time()
        labels = ["source_service", "destination_service"]
        req = CounterMetricFamily(
            "mesh_edge_requests", "requests per service pair, all sidecars", labels=labels
        )
        err = CounterMetricFamily(
            "mesh_edge_errors", "failed requests (5xx or no response) per pair", labels=labels
        )
        dur = HistogramMetricFamily(
            "mesh_edge_request_duration_seconds", "request duration per pair", labels=labels
        )
        for (src, dst), agg in sorted(st.totals.items()):
            req.add_metric([src, dst], agg.requests)
            err.add_metric([src, dst], agg.errors)
            dur.add_metric(
                [src, dst],
                [
                    ("+Inf" if le == float("inf") else repr(le), n)
                    for le, n in agg.hist.cumulative(4)
                ],
                agg.hist.sum,
            )
        yield req
        yield err
        yield dur
        tcp_families = [
            CounterMetricFamily(name, text, labels=labels)
            for name, text in (
                ("mesh_edge_tcp_connections_opened", "opaque TCP connections opened per pair"),
                ("mesh_edge_tcp_connections_closed", "opaque TCP connections closed per pair"),
                ("mesh_edge_tcp_sent_bytes", "TCP bytes sent by the source per pair"),
                ("mesh_edge_tcp_received_bytes", "TCP bytes received by the source per pair"),
                ("mesh_edge_tcp_connections_denied", "TCP connections refused by policy"),
            )
        ]
        for (src, dst), agg in sorted(st.totals.items()):
            if agg.tcp is not None:
                for family, n in zip(tcp_families, agg.tcp.as_tuple(), strict=True):
                    family.add_metric([src, dst], n)
        yield from tcp_families
        wl = [*labels, "window"]
        rps = GaugeMetricFamily("mesh_edge_requests_per_second", "request rate", labels=wl)
        ratio = GaugeMetricFamily("mesh_edge_error_ratio", "failed / all requests", labels=wl)
        lat = GaugeMetricFamily(
            "mesh_edge_latency_seconds",
            "latency quantiles from merged histograms",
            labels=[*wl, "quantile"],
        )
        for edge in sorted(st.edges):
            for window, g in st.edge_signals(edge, now).items():
                rps.add_metric([*edge, window], g["rps"])
                ratio.add_metric([*edge, window], g["error_rate"])
                for q in ("p50", "p90", "p99"):
                    v = g[f"{q}_ms"]
                    if v is not None:
                        lat.add_metric([*edge, window, "0." + q[1:]], v / 1000)
        yield rps
        yield ratio
        yield lat
        for name, value, text in (
            ("mesh_telemetry_batches", st.stats.batches, "batches merged"),
            ("mesh_telemetry_duplicate_batches", st.stats.duplicates, "batches seen twice"),
            ("mesh_telemetry_lost_batches", st.stats.lost, "batches missing (seq gaps)"),
            ("mesh_telemetry_bad_batches", st.stats.bad, "batches refused (schema)"),
        ):
            c = CounterMetricFamily(name, text)
            c.add_metric([], value)
            yield c


class TelemetryActor:
    name = "telemetry"

    def __init__(
        self,
        *,
        metrics_port: int | None = DEFAULT_METRICS_PORT,
        host: str = "127.0.0.1",
        publish_interval: float = 1.0,
    ) -> None:
        self.metrics_port_wanted = metrics_port
        self.host = host
        self.publish_interval = publish_interval
        self.metrics_port = 0
        self.started = 0.0
        self.state = GraphState()
        self.spans = SpanStore()
        self.registry = CollectorRegistry()
        self.registry.register(MeshCollector(self.state))

    @classmethod
    def from_env(cls) -> TelemetryActor:
        raw = os.environ.get("MESH_METRICS_PORT", str(DEFAULT_METRICS_PORT))
        return cls(
            metrics_port=None if raw in ("", "off") else int(raw),
            host=os.environ.get("MESH_HTTP_HOST", "127.0.0.1"),
        )

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # A restarted actor starts from an empty graph (the windows refill within 5 min);
        # its replies say how long it has been merging (covered_s) so clients prefer older ones.
        self.started = trio.current_time()
        self.state = GraphState()
        self.registry = CollectorRegistry()
        self.registry.register(MeshCollector(self.state))
        async with trio.open_nursery() as nursery:
            await nursery.start(self._ingest, ctx)
            await nursery.start(self._spans, ctx)
            await nursery.start(self._queries, ctx)
            if self.metrics_port_wanted is not None:
                listeners = await bind(self.host, self.metrics_port_wanted)
                self.metrics_port = bound_port(listeners)
                nursery.start_soon(serve, listeners, self._http)
                log.info("mesh metrics on http://%s:%d/metrics", self.host, self.metrics_port)
            nursery.start_soon(self._publish_golden, ctx)
            task_status.started()

    async def _ingest(self, ctx: ActorContext, *, task_status: trio.TaskStatus[None]) -> None:
        state = self.state

        def decode(data: bytes) -> ParsedBatch:
            try:
                return parse_batch(data)
            except BadBatch:
                state.stats.bad += 1
                raise

        # Decoded on the bus's side of the callback; a batch that breaks the schema is
        # dropped by the bus (BadBatch is a MessageError) and counted here as bad.
        async with ctx.bus.subscribe_decoded(
            subjects.TELEMETRY_ALL, decode, capacity=65536, overflow=Overflow.DROP_OLDEST
        ) as sub:
            task_status.started()
            async for d in sub:
                if not from_sender(d.subject, d.body):
                    state.stats.bad += 1
                    continue
                state.ingest(d.body, trio.current_time())

    async def _spans(self, ctx: ActorContext, *, task_status: trio.TaskStatus[None]) -> None:
        async with ctx.bus.subscribe(subjects.SPANS_ALL, capacity=16384) as sub:
            task_status.started()
            async for d in sub:
                # mesh.spans.<service>: only that service's sidecars may publish there.
                if isinstance(d.body, SpanRecord) and d.subject == _span_subject(d.body):
                    self.spans.add(d.body)

    async def _queries(self, ctx: ActorContext, *, task_status: trio.TaskStatus[None]) -> None:
        async with (
            ctx.bus.subscribe(subjects.GRAPH_QUERY, queue=subjects.TELEMETRY_QUEUE) as graph_q,
            ctx.bus.subscribe(subjects.GRAPH_SCATTER) as scatter_q,
            ctx.bus.subscribe(subjects.TRACE_QUERY, queue=subjects.TELEMETRY_QUEUE) as trace_q,
            trio.open_nursery() as nursery,
        ):

            async def traces() -> None:
                async for d in trace_q:
                    if isinstance(d.body, TraceQuery):
                        spans = self.spans.get(d.body.trace_id)
                        ctx.bus.reply(d, TraceReply(trace_id=d.body.trace_id, spans=spans))

            async def scatter() -> None:
                async for d in scatter_q:
                    q = d.body
                    if isinstance(q, GraphQuery) and q.reply_to.startswith(_REPLIES):
                        try:
                            ctx.bus.publish_nowait(
                                q.reply_to, self.graph_reply(ctx.replica, q.window)
                            )
                        except MeshError as exc:
                            log.debug("graph reply to %s not sent: %s", q.reply_to, exc)

            nursery.start_soon(traces)
            nursery.start_soon(scatter)
            task_status.started()
            async for d in graph_q:
                if isinstance(d.body, GraphQuery):
                    ctx.bus.reply(d, self.graph_reply(ctx.replica, d.body.window))

    def graph_reply(self, replica: str, window: str) -> GraphReply:
        if window not in WINDOWS:
            window = "10s"
        nodes, edges = self.state.graph(window, trio.current_time())
        return GraphReply(
            replica=replica,
            ts=time.time(),
            window=window,
            nodes=nodes,
            edges=edges,
            ingest={**self.state.stats.to_dict(), "metrics_port": self.metrics_port},
            covered_s=round(trio.current_time() - self.started, 3),
        )

    async def _publish_golden(self, ctx: ActorContext) -> None:
        while True:
            await trio.sleep(self.publish_interval)
            now = trio.current_time()
            self.state.expire(now)
            for src, dst in list(self.state.edges):
                try:
                    ctx.bus.publish_nowait(
                        subjects.golden(src, dst),
                        GoldenSummary(
                            replica=ctx.replica,
                            src=src,
                            dst=dst,
                            ts=time.time(),
                            windows=self.state.edge_signals((src, dst), now),
                        ),
                    )
                except MeshError as exc:  # a name unfit for a subject, or a full outbox
                    log.debug("golden %s->%s not published: %s", src, dst, exc)

    async def _http(self, req: Request) -> Response:
        if req.path == "/metrics":
            return Response(200, "text/plain; version=0.0.4", generate_latest(self.registry))
        if req.path == "/healthz":
            return Response(200, "text/plain", b"ok\n")
        return Response(404, "text/plain", b"not found: try /metrics\n")


async def query_graph(
    bus: Bus, window: str, *, timeout: float = 2.0, settle: float = 0.25
) -> GraphReply:
    """Ask every aggregator replica (mesh.graph.scatter) and keep the answer of the one
    that has merged batches the longest: a replica that just (re)started has partial
    windows. Waits `settle` seconds after the first answer for the others."""
    subject = subjects.graph_replies(secrets.token_hex(8))
    replies: list[GraphReply] = []
    async with bus.subscribe(subject) as sub:
        bus.publish_nowait(subjects.GRAPH_SCATTER, GraphQuery(window=window, reply_to=subject))
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline) as scope:
            async for d in sub:
                if isinstance(d.body, GraphReply):
                    replies.append(d.body)
                    scope.deadline = min(deadline, trio.current_time() + settle)
    if not replies:
        raise BusError(
            f"no telemetry aggregator answered on {subjects.GRAPH_SCATTER} within {timeout:g} s: "
            "is the control plane running (`mesh up`)?"
        )
    return max(replies, key=lambda r: (r.covered_s, r.replica))
