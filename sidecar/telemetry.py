"""Per-sidecar telemetry: the request-path recorder, the batch publisher, /metrics families.

The request path calls `Recorder.record(...)` once per request: two dict
lookups and a few integer additions (bench/telemetry.py measures it). Every
interval `TelemetryPublisher` swaps the recorder's current per-pair aggregates
for empty ones and publishes them as one msgpack batch on
``mesh.telemetry.<namespace>.<service>.<instance>`` (docs/telemetry.md).
`TelemetryCollector` exports cumulative totals to a prometheus-client registry
(the sidecar admin port's ``/metrics``) at scrape time, so nothing on the request
path touches prometheus-client.

Labels are bounded: service names and versions come from mesh configuration,
codes are clamped to 100..599 (else "0"), flags are the sidecar's fixed set.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from math import ceil, log2

import trio
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from bus import subjects
from bus.client import Bus, connect
from mesh.errors import BusError, ConfigError, MeshError
from mesh.stats import BASE_S, GROWTH_LOG2, NBUCKETS, PairAgg
from mesh.telemetry import PairKey, build_batch
from sidecar.accesslog import AccessLog
from sidecar.tcp_telemetry import TcpCollector, TcpRecorder
from sidecar.tracing import Hop, HopTracer, SpanShipper, next_tick

log = logging.getLogger("mesh.sidecar.telemetry")

# Pairs per published batch; a sidecar talking to more pairs sends several batches.
MAX_PAIRS_PER_BATCH = 500
# Every 4th histogram bound (100 µs * 2**k) becomes a Prometheus bucket: 20 buckets.
PROM_BUCKET_EVERY = 4

RequestKey = tuple[str, str, str, int, str]
# (src, dst, dst_version, code, flags, duration, rx_bytes, tx_bytes)
PendingRequest = tuple[str, str, str, int, str, float, int, int]
# Recorded requests are folded into the aggregates at least this often (and at every
# batch and scrape): bounds the memory they hold between two batches.
FOLD_EVERY = 4096
_INV_BASE = 1.0 / BASE_S
_INV_GROWTH = 1.0 / GROWTH_LOG2
_LAST_BUCKET = NBUCKETS - 1  # (src, dst, ver, code, flags)


class Recorder:
    """Counts requests per (source, destination, version). Not thread-safe; no I/O."""

    def __init__(self, namespace: str, service: str, instance: str) -> None:
        self.subject = subjects.telemetry(namespace, service, instance)
        self.namespace = namespace
        self.service = service
        self.instance = instance
        self.epoch = secrets.token_hex(6)
        self.pending: list[PendingRequest] = []  # recorded, not yet folded into `current`
        self.current: dict[PairKey, PairAgg] = {}
        self.folded: dict[PairKey, PairAgg] = {}  # previous intervals, for /metrics
        self.requests: dict[RequestKey, int] = {}  # cumulative, by code and flags
        self.tcp = TcpRecorder()  # opaque TCP per pair (sidecar/tcp_telemetry.py)
        self.retries: dict[str, int] = {}
        self.ejections: dict[str, int] = {}
        self.overflows: dict[str, int] = {}
        self.config_version = ""
        self.cert_not_after = 0.0  # unix seconds; 0: no certificate
        self.batches_published = 0
        self.publish_errors = 0

    # -- the request path ----------------------------------------------------

    def record(
        self,
        src: str,
        dst: str,
        dst_version: str,
        code: int,
        flags: str,
        duration: float,
        rx_bytes: int = 0,
        tx_bytes: int = 0,
    ) -> None:
        """One finished request: status `code` (0: no response), `duration` in seconds."""
        pending = self.pending
        pending.append((src, dst, dst_version, code, flags, duration, rx_bytes, tx_bytes))
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Merge the requests recorded since the last fold into the interval's aggregates.

        The request path only appends a tuple; the aggregation runs here, over many
        requests in one tight loop, where it costs a quarter of what the same code costs
        when it runs between two requests' proxying (bench/proxy_path.py)."""
        pending = self.pending  # cleared in place: SidecarTelemetry holds it too
        current = self.current
        requests = self.requests
        for src, dst, dst_version, code, flags, duration, rx_bytes, tx_bytes in pending:
            key = (src, dst, dst_version)
            agg = current.get(key)
            if agg is None:
                agg = current[key] = PairAgg()
            agg.requests += 1
            c = code // 100
            if 1 <= c <= 5:
                agg.codes[c] += 1
                if c == 5:
                    agg.errors += 1
            else:
                agg.codes[0] += 1
                agg.errors += 1
                code = 0
            hist = agg.hist
            if duration <= BASE_S:
                hist.counts[0] += 1
            else:
                i = ceil(log2(duration * _INV_BASE) * _INV_GROWTH - 1e-9)
                hist.counts[i if i < _LAST_BUCKET else _LAST_BUCKET] += 1
            hist.count += 1
            hist.sum += duration
            agg.rx_bytes += rx_bytes
            agg.tx_bytes += tx_bytes
            if flags:
                agg.flags[flags] = agg.flags.get(flags, 0) + 1
            rkey = (src, dst, dst_version, code, flags)
            requests[rkey] = requests.get(rkey, 0) + 1
        pending.clear()

    # -- other events (connection and resilience layers) ---------------------

    def tcp_open(self, dst: str) -> None:
        """A connection to `dst` counted without a splice (the TCP listeners use `self.tcp`)."""
        self.tcp.add("source", self.service, dst, "", opened=1)

    def tcp_close(self, dst: str, rx_bytes: int, tx_bytes: int) -> None:
        self.tcp.add("source", self.service, dst, "", closed=1, sent=tx_bytes,
                     received=rx_bytes)

    def retry(self, src: str, dst: str, dst_version: str) -> None:
        """A try to `dst`/`dst_version` failed and is sent again: per destination for
        /metrics, and per pair in the batch (the aggregator's actual success rate)."""
        self.retries[dst] = self.retries.get(dst, 0) + 1
        key = (src, dst, dst_version)
        agg = self.current.get(key)
        if agg is None:
            agg = self.current[key] = PairAgg()
        agg.retries += 1

    def ejection(self, dst: str) -> None:
        self.ejections[dst] = self.ejections.get(dst, 0) + 1

    def overflow(self, dst: str) -> None:
        self.overflows[dst] = self.overflows.get(dst, 0) + 1

    # -- the interval --------------------------------------------------------

    def take(self) -> dict[PairKey, PairAgg]:
        """The aggregates since the last call; they are folded into the /metrics totals."""
        self.fold()
        taken, self.current = self.current, {}
        for key, agg in taken.items():
            total = self.folded.get(key)
            if total is None:
                total = self.folded[key] = PairAgg()
            total.merge(agg)
        return taken

    def totals(self) -> dict[PairKey, PairAgg]:
        """Cumulative aggregates including the current interval (for a scrape)."""
        self.fold()
        out: dict[PairKey, PairAgg] = {}
        for source in (self.folded, self.current):
            for key, agg in source.items():
                total = out.get(key)
                if total is None:
                    total = out[key] = PairAgg()
                total.merge(agg)
        return out


class TelemetryPublisher:
    """Publishes the recorder's interval aggregates on its subject every `interval` s.

    `bus` may be None (or set to None while NATS is away): the aggregates then keep
    accumulating and the next batch covers the whole time since the last one.
    """

    def __init__(self, recorder: Recorder, bus: Bus | None, *, interval: float = 1.0) -> None:
        self.recorder = recorder
        self.bus = bus
        self.interval = interval
        self.seq = 0
        self._last_cut = time.time()

    def publish_once(self) -> int:
        """Publish what was recorded since the last call; returns the batches sent."""
        r = self.recorder
        bus = self.bus
        if bus is None:
            return 0  # keep accumulating until there is a bus
        now = time.time()
        covered, self._last_cut = now - self._last_cut, now
        tcp = r.tcp.take()
        r.fold()
        if not r.current and not tcp:
            return 0
        pairs = r.take()
        for key, t in tcp.items():  # TCP rows ride in the same pairs (docs/telemetry.md)
            agg = pairs.get(key)
            if agg is None:
                agg = pairs[key] = PairAgg()
            agg.tcp = t
        items = list(pairs.items())
        sent = 0
        for start in range(0, len(items), MAX_PAIRS_PER_BATCH):
            self.seq += 1
            batch = build_batch(
                namespace=r.namespace,
                service=r.service,
                instance=r.instance,
                epoch=r.epoch,
                seq=self.seq,
                ts=now,
                interval=round(covered, 3),
                pairs=dict(items[start : start + MAX_PAIRS_PER_BATCH]),
            )
            try:
                bus.publish_nowait(r.subject, batch)
            except (MeshError, trio.ClosedResourceError) as exc:  # best effort, unlike requests
                r.publish_errors += 1
                log.warning("telemetry batch %d not published: %s", self.seq, exc)
            else:
                r.batches_published += 1
                sent += 1
        return sent

    async def run(self, *, origin: float | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish at `origin + k * interval` (trio time; default: now)."""
        task_status.started()
        start = trio.current_time() if origin is None else origin
        tick = 0
        try:
            while True:
                tick = await next_tick(start, self.interval, tick)
                self.publish_once()
        finally:
            # The last partial interval: queued without waiting (the bus flushes on close).
            self.publish_once()


def _code_label(code: int) -> str:
    return str(code) if code else "0"


class TelemetryCollector(Collector):
    """The issue's metric families, read from a `Recorder` at scrape time."""

    def __init__(self, recorder: Recorder, clock: Callable[[], float] = time.time) -> None:
        self.recorder = recorder
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        r = self.recorder
        r.fold()
        pair_labels = ["source_service", "destination_service", "destination_version"]
        requests = CounterMetricFamily(
            "mesh_requests",
            "HTTP requests handled, by source, destination, response code and flags",
            labels=[*pair_labels, "response_code", "response_flags"],
        )
        for (src, dst, ver, code, flags), n in sorted(r.requests.items()):
            requests.add_metric([src, dst, ver, _code_label(code), flags], n)
        yield requests

        totals = sorted(r.totals().items())
        duration = HistogramMetricFamily(
            "mesh_request_duration_seconds",
            "request duration seen by the sidecar, from request start to response end",
            labels=pair_labels,
        )
        rx = CounterMetricFamily(
            "mesh_request_bytes", "request body and header bytes received", labels=pair_labels
        )
        tx = CounterMetricFamily(
            "mesh_response_bytes", "response body and header bytes sent", labels=pair_labels
        )
        for key, agg in totals:
            buckets = [
                ("+Inf" if le == float("inf") else repr(le), n)
                for le, n in agg.hist.cumulative(PROM_BUCKET_EVERY)
            ]
            duration.add_metric(list(key), buckets, agg.hist.sum)
            rx.add_metric(list(key), agg.rx_bytes)
            tx.add_metric(list(key), agg.tx_bytes)
        yield duration
        yield rx
        yield tx

        yield from TcpCollector(r.tcp).collect()
        for name, text, values in (
            ("mesh_retries", "retries sent upstream", r.retries),
            ("mesh_outlier_ejections", "endpoints ejected by outlier detection", r.ejections),
            (
                "mesh_circuit_breaker_overflows",
                "requests refused by an open circuit breaker",
                r.overflows,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["destination_service"])
            for dst, n in sorted(values.items()):
                family.add_metric([dst], n)
            yield family

        info = GaugeMetricFamily(
            "mesh_config_info", "the configuration snapshot in use (value 1)", labels=["version"]
        )
        info.add_metric([r.config_version], 1)
        yield info
        if r.cert_not_after:
            expiry = GaugeMetricFamily(
                "mesh_certificate_expiry_seconds", "seconds until the sidecar certificate expires"
            )
            expiry.add_metric([], round(r.cert_not_after - self.clock(), 3))
            yield expiry
        batches = CounterMetricFamily(
            "mesh_telemetry_batches_published", "telemetry batches queued on the bus"
        )
        batches.add_metric([], r.batches_published)
        yield batches
        errors = CounterMetricFamily(
            "mesh_telemetry_publish_errors", "telemetry batches the bus refused"
        )
        errors.add_metric([], r.publish_errors)
        yield errors


@dataclass(frozen=True)
class TelemetryOptions:
    """What a sidecar's telemetry does; every part is optional except the recorder."""

    namespace: str = "default"
    interval: float = 1.0  # seconds between telemetry batches
    trace_sample_ratio: float = 0.01  # of new traces; hops follow an incoming decision
    otlp_endpoint: str | None = None  # e.g. http://collector:4318 (spans POSTed to /v1/traces)
    access_log: str | None = None  # a path, or "-" for stdout; None: no access log
    access_log_publish: bool = False  # also publish entries on mesh.accesslog.<service>

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ConfigError(
                f"telemetry interval {self.interval!r} must be a positive number of seconds")


class SidecarTelemetry:
    """Everything the request path needs, behind two calls (`begin`, `end`) and one task.

    Wiring (sidecar/server.py and sidecar/proxy.py; docs/telemetry.md):

        tel = SidecarTelemetry(service, instance, TelemetryOptions(...), nats=servers)
        tel.register(admin.registry)                # /metrics families
        await nursery.start(tel.run)                # batches, spans, access-log flushes
        # per request, at the edges:
        hop = tel.begin(method_and_path, traceparent, tracestate)
        ...forward with headers traceparent=hop.traceparent (+ tracestate if non-empty)...
        tel.end(hop, src=..., dst=..., dst_version=..., status=..., flags=..., ...)

    The HTTP proxy does the same with `start_request_hop` and `requests_pending`
    inlined (HttpProxy._request), because this is its hottest path.

    The bus is either given (`bus=`, e.g. in tests), attached later (`attach`/`detach`,
    e.g. by a component that owns the sidecar's NATS connection), or owned: with
    `nats=` URLs, `run` keeps its own connection, reconnecting after failures. While
    there is no bus, aggregates accumulate and are sent once there is one.
    """

    def __init__(
        self,
        service: str,
        instance: str,
        opts: TelemetryOptions,
        bus: Bus | None = None,
        *,
        nats: Sequence[str] | None = None,
    ) -> None:
        self.opts = opts
        self.nats = tuple(nats or ())
        self.service = service
        self.instance = instance
        self.recorder = Recorder(opts.namespace, service, instance)
        self.tracer = HopTracer(service, sample_ratio=opts.trace_sample_ratio)
        # The proxy's hot path uses these directly (HttpProxy._request): a hop from raw
        # header bytes, the next new traces' hops, and the queue `Recorder.record` fills.
        self.start_request_hop = self.tracer.start_request_hop
        self.fresh_hops = self.tracer.fresh
        self.requests_pending = self.recorder.pending
        self.publisher = TelemetryPublisher(self.recorder, None, interval=opts.interval)
        self.shipper = SpanShipper(self.tracer, bus=None, otlp_endpoint=opts.otlp_endpoint)
        self.access_log = AccessLog(opts.access_log, service=service) if opts.access_log else None
        self.attach(bus)

    def attach(self, bus: Bus | None) -> None:
        """Use this bus from now on (None: none, until the next attach)."""
        self.bus = bus
        self.publisher.bus = bus
        self.shipper.bus = bus
        if self.access_log is not None and self.opts.access_log_publish:
            self.access_log.bus = bus

    def detach(self) -> None:
        self.attach(None)

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(TelemetryCollector(self.recorder))

    def begin(
        self,
        name: str,
        traceparent: str | None,
        tracestate: str | None,
        *,
        outbound: bool = False,
    ) -> Hop:
        """At request start: the hop (span) whose `traceparent` goes upstream."""
        kind = SpanKind.CLIENT if outbound else SpanKind.SERVER
        return self.tracer.start_hop(name, traceparent, tracestate, kind=kind)

    def end(
        self,
        hop: Hop,
        *,
        src: str,
        dst: str,
        dst_version: str,
        status: int,
        flags: str,
        start_time: float,
        duration: float,
        rx_bytes: int,
        tx_bytes: int,
        method: str = "",
        path: str = "",
        authority: str = "",
        upstream: str = "",
        request_id: str = "",
        count: bool = True,
    ) -> None:
        """One finished request: metrics and batch aggregates (unless `count` is False),
        span end, access-log line.

        Count each request once in the mesh: on the outbound side (the client's view,
        which sees connect failures, timeouts and exhausted retries), and on the inbound
        side only when the caller is not in the mesh (no source: ingress, plain clients).
        """
        if count:
            self.recorder.record(src, dst, dst_version, status, flags, duration, rx_bytes, tx_bytes)
        hop.finish(status, flags)
        if self.access_log is not None:
            self.access_log.record(
                start_time=start_time,
                method=method,
                path=path,
                authority=authority,
                status=status,
                response_flags=flags,
                duration=duration,
                upstream=upstream,
                source=src,
                request_id=request_id,
                trace_id=hop.trace_id,
                rx_bytes=rx_bytes,
                tx_bytes=tx_bytes,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One grid for both: with a batch interval that is a multiple of the span interval
        # (1 s and 0.5 s by default) every batch tick is also a span tick, so an idle
        # sidecar wakes twice a second for telemetry, not three times.
        origin = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(self.publisher.run, origin=origin))
            await nursery.start(partial(self.shipper.run, origin=origin))
            if self.access_log is not None:
                await nursery.start(self.access_log.run)
            if self.nats:
                nursery.start_soon(self._own_bus)
            task_status.started()

    async def _own_bus(self) -> None:
        delay = 0.5
        while True:
            try:
                async with connect(
                    self.nats, name=f"telemetry-{self.service}-{self.instance}"
                ) as bus:
                    delay = 0.5
                    self.attach(bus)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self.detach()
            except BusError as exc:
                log.warning("telemetry: NATS unavailable (%s); retrying in %.1f s", exc, delay)
            await trio.sleep(delay)
            delay = min(10.0, delay * 2)
