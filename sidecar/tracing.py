"""W3C trace context and one span per sidecar hop.

Pure helpers parse and format ``traceparent``/``tracestate``
(https://www.w3.org/TR/trace-context/). `HopTracer` makes one OpenTelemetry SDK
span per sampled hop: a child of the incoming ``traceparent`` when there is one (a
new trace otherwise). The first sidecar decides sampling (a ratio of new traces) and
the others follow the flag it sends; an unsampled hop makes no SDK span and forwards
the traceparent it received (or a new one). Finished sampled spans are kept in
memory until `SpanShipper` (a trio task, no threads) publishes them over NATS on
``mesh.spans.<service>`` (for `mesh trace ID`) and, when an endpoint is set,
POSTs them as OTLP/HTTP protobuf to ``<endpoint>/v1/traces``.

Request path:

    hop = tracer.start_hop("GET /users", request_traceparent, request_tracestate)
    ... send upstream with headers traceparent=hop.traceparent (and tracestate) ...
    hop.finish(status, flags)
"""

from __future__ import annotations

import logging
import math
import random
import re
import ssl
import time
from binascii import hexlify
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from bus import subjects
from bus.client import Bus
from mesh.errors import ConfigError, MeshError
from mesh.messages import SpanRecord

log = logging.getLogger("mesh.sidecar.tracing")

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACESTATE_MAX = 512
_EMPTY_CONTEXT = Context()
# Finished sampled hops are made into SDK spans and shipped this many at a time, with a
# checkpoint between batches, so a burst of sampled traffic does not stall the sidecar.
_SHIP_CHUNK = 256
MAX_PENDING_SPANS = 10_000


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str  # 32 lowercase hex
    parent_id: str  # 16 lowercase hex
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)


def parse_traceparent(value: str | None) -> TraceParent | None:
    """The W3C traceparent, or None when absent or invalid (the spec: then start a new trace)."""
    if not value:
        return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceParent(trace_id, parent_id, int(flags, 16))


def format_traceparent(trace_id: str, span_id: str, flags: int) -> str:
    return f"00-{trace_id}-{span_id}-{flags & 0xFF:02x}"


def clean_tracestate(value: str | None) -> str:
    """The tracestate to forward: list members kept in order, empty ones dropped, at most
    32 members and 512 characters (whole members are dropped from the end)."""
    if not value:
        return ""
    members = [m.strip() for m in value.split(",") if "=" in m][:32]
    out: list[str] = []
    size = 0
    for m in members:
        if size + len(m) + (1 if out else 0) > _TRACESTATE_MAX:
            break
        out.append(m)
        size += len(m) + (1 if len(out) > 1 else 0)
    return ",".join(out)


class _Deferred:
    """A sampled hop's span before the SDK makes it: what `HopTracer.materialize` needs.

    The request path only notes ids, times and attributes; the SDK span is made, with
    the same ids and times, when the shipper takes the finished spans. One SDK span
    costs ~15 µs when made in a batch and several times that when made between two
    requests, so this keeps 1 % sampling off the request path's bill."""

    __slots__ = ("attributes", "end_ns", "error", "kind", "name", "parent", "span_id",
                 "start_ns", "trace_id")

    def __init__(self, name: str, parent: TraceParent | None, trace_id: int, span_id: int,
                 kind: SpanKind, attributes: dict[str, Any]) -> None:
        self.name = name
        self.parent = parent
        self.trace_id = trace_id
        self.span_id = span_id
        self.kind = kind
        self.attributes = attributes
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error = False


class _IdSource(IdGenerator):
    """Gives the SDK the ids a hop already sent upstream (set just before each span)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return self.trace_id

    def generate_span_id(self) -> int:
        return self.span_id

    def is_trace_id_random(self) -> bool:
        # Every id a hop draws is random (HopTracer); the SDK then sets the W3C level-2
        # random-trace-id flag (0x02), as the headers already sent say.
        return True


class _Collector(SpanProcessor):
    """Keeps finished sampled spans for the shipper (bounded; overflow is counted)."""

    def __init__(self, materialize: Callable[[list[_Deferred]], None]) -> None:
        self.finished: list[_Deferred] = []  # hops ended, SDK spans not made yet
        self.pending: list[ReadableSpan] = []
        self.dropped = 0
        self._materialize = materialize

    def add(self, deferred: _Deferred) -> None:
        if len(self.finished) + len(self.pending) < MAX_PENDING_SPANS:
            self.finished.append(deferred)
        else:
            self.dropped += 1

    def on_end(self, span: ReadableSpan) -> None:
        if len(self.pending) < MAX_PENDING_SPANS:
            self.pending.append(span)
        else:
            self.dropped += 1

    def take(self, limit: int | None = None) -> list[ReadableSpan]:
        """The finished spans, as SDK spans; at most `limit` hops are made into spans per
        call (the rest stay in `finished`)."""
        if self.finished:
            if limit is None or len(self.finished) <= limit:
                finished, self.finished = self.finished, []
            else:
                finished, self.finished = self.finished[:limit], self.finished[limit:]
            self._materialize(finished)
        taken, self.pending = self.pending, []
        return taken

    def discard(self) -> int:
        """Drop every finished span without making it; returns how many."""
        n = len(self.finished) + len(self.pending)
        self.finished, self.pending = [], []
        return n


class Hop:
    """One sidecar hop: `header`/`state_header` are the traceparent/tracestate values to
    send upstream, as bytes, because that is what the proxy writes.

    Only a sampled hop has an SDK span; an unsampled one is a header made from random
    bytes, so the 99 % of requests that are not traced cost well under 1 µs here. The
    str views (`traceparent`, `trace_id`, ...) are made only when asked for.
    """

    __slots__ = ("_collector", "_span", "header", "new", "sampled", "state_header")

    def __init__(self, span: _Deferred | None, header: bytes, state_header: bytes,
                 sampled: bool, collector: _Collector | None = None, new: bool = False) -> None:
        self._span = span
        self.header = header
        self.state_header = state_header
        self.sampled = sampled
        self._collector = collector
        self.new = new  # this hop started the trace (no usable traceparent came in)

    @classmethod
    def of(cls, trace_id: str, span_id: str, flags: int, tracestate: str,
           new: bool = False) -> Hop:
        """An unsampled hop (no span) from str ids."""
        header = format_traceparent(trace_id, span_id, flags).encode("ascii")
        return cls(None, header, tracestate.encode("latin-1", "replace"), bool(flags & 1),
                   None, new)

    @property
    def traceparent(self) -> str:
        return self.header.decode("ascii")

    @property
    def tracestate(self) -> str:
        return self.state_header.decode("latin-1")

    @property
    def trace_id(self) -> str:
        return self.header[3:35].decode("ascii")

    @property
    def span_id(self) -> str:
        return self.header[36:52].decode("ascii")

    def finish(self, status: int, flags: str = "", **attrs: Any) -> None:
        deferred, collector = self._span, self._collector
        if deferred is None or collector is None:
            return
        self._span = None  # a second finish must not record the span again
        deferred.end_ns = time.time_ns()
        attributes = deferred.attributes
        attributes["http.response.status_code"] = status
        if flags:
            attributes["mesh.response_flags"] = flags
        attributes.update(attrs)
        deferred.error = status >= 500 or status < 100
        collector.add(deferred)


# Bit 0 of the span id and bit 0 of the trace id (bit 64 of the 192-bit draw) set.
_LOW_BITS = 1 | (1 << 64)
# A version-00 traceparent whose sampled flag is clear: the in-mesh common case, which
# the proxy handles without decoding (anything else goes through parse_traceparent).
_UNSAMPLED_00 = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f][02468ace]")
_ZERO_TRACE = b"00-" + b"0" * 32
_ZERO_SPAN = b"0" * 16
_ZERO_ID = b"0" * 32
_FRESH_BATCH = 256
# W3C trace context level 2: the trace id is random. Set on the traces this tracer starts.
_RANDOM = 0x02


class HopTracer:
    """Makes hops. The sampling decision is taken once per trace, by the first sidecar
    (`sample_ratio` of new traces); later hops follow the sampled flag they receive."""

    def __init__(
        self, service: str, *, sample_ratio: float = 0.01, rng: random.Random | None = None
    ) -> None:
        if not 0.0 <= sample_ratio <= 1.0:
            raise ConfigError(f"trace sample ratio {sample_ratio} is not between 0 and 1")
        self.service = service
        self.sample_ratio = sample_ratio
        self._rng = rng or random.Random()
        # The next new traces' hops, last first (_refill; None: sampled). The proxy pops
        # unsampled ones itself: a call less per request.
        self.fresh: list[Hop | None] = []
        self.collector = _Collector(self.materialize)
        self._ids = _IdSource()
        # The decision is ours (above); the SDK only sees hops that are sampled.
        self.provider = TracerProvider(
            sampler=ParentBased(ALWAYS_ON),
            resource=Resource.create({"service.name": service}),
            shutdown_on_exit=False,
            id_generator=self._ids,
        )
        self.provider.add_span_processor(self.collector)
        self.tracer = self.provider.get_tracer("trio-mesh.sidecar")

    def start_hop(
        self,
        name: str,
        traceparent: str | None = None,
        tracestate: str | None = None,
        *,
        kind: SpanKind = SpanKind.SERVER,
        attributes: dict[str, Any] | None = None,
    ) -> Hop:
        rng = self._rng
        parent = parse_traceparent(traceparent) if traceparent else None
        if parent is None:
            sampled = rng.random() < self.sample_ratio
            if not sampled:
                # The common case: a new, unsampled trace. One draw gives both ids; the two
                # forced bits keep them non-zero, as the spec requires.
                ids = f"{rng.getrandbits(192) | _LOW_BITS:048x}"
                return Hop.of(ids[:32], ids[32:], _RANDOM, "", new=True)
            state = ""
        else:
            state = clean_tracestate(tracestate) if tracestate else ""
            if not parent.sampled:
                return self._unsampled_child(parent, state)
        return self._span_hop(name, parent, state, kind, attributes)

    def _unsampled_child(self, parent: TraceParent, state: str) -> Hop:
        """A hop in a trace someone else decided not to sample: no span, so the parent's
        ids go on unchanged (as version 00). W3C trace context lets a participant that
        records nothing forward the parent-id it received; a new id would name a span
        that nobody recorded, and an instrumented app behind this hop would lose its
        real parent (the calling app's span)."""
        return Hop.of(parent.trace_id, parent.parent_id, parent.flags, state)

    def _refill(self) -> Hop | None:
        """Decide and draw the next `_FRESH_BATCH` new traces at once (None: sampled; its
        ids are drawn when it starts) and return the first. Made in one tight loop from
        one block of random hex, an unsampled hop costs a third of what it costs when
        made between two requests."""
        rng, ratio, fresh = self._rng, self.sample_ratio, self.fresh
        while not fresh:
            block = hexlify(rng.randbytes(24 * _FRESH_BATCH))
            for i in range(0, 48 * _FRESH_BATCH, 48):
                if rng.random() < ratio:
                    fresh.append(None)
                    continue
                trace_id, span_id = block[i : i + 32], block[i + 32 : i + 48]
                if trace_id == _ZERO_ID[:32] or span_id == _ZERO_ID[:16]:
                    continue  # all-zero ids are invalid (W3C); p = 2**-64
                fresh.append(Hop(None, b"".join((b"00-", trace_id, b"-", span_id, b"-02")),
                                 b"", False, None, True))
        return fresh.pop()

    def start_request_hop(
        self,
        method: bytes,
        target: bytes,
        traceparent: bytes | None,
        tracestate: bytes | None,
        kind: SpanKind,
    ) -> Hop:
        """`start_hop` for the proxy: header values as received, and the span name
        ("METHOD /path") built only for a sampled hop. Same decisions, same ids."""
        if traceparent is None:
            fresh = self.fresh
            hop = fresh.pop() if fresh else self._refill()
            if hop is not None:
                return hop
            name = f"{method.decode('latin-1')} {target.split(b'?', 1)[0].decode('latin-1')}"
            return self._span_hop(name, None, "", kind, None)
        if (
            _UNSAMPLED_00.fullmatch(traceparent) is not None
            and not traceparent.startswith(_ZERO_TRACE)
            and not traceparent.startswith(_ZERO_SPAN, 36)
        ):
            # Most in-mesh requests: the caller's sidecar decided not to sample. Forwarded
            # as received (_unsampled_child says why); no decoding, no span name.
            state = b""
            if tracestate is not None:
                state = clean_tracestate(tracestate.decode("latin-1")).encode("latin-1")
            return Hop(None, traceparent, state, False)
        tp = traceparent.decode("latin-1")
        state_str = tracestate.decode("latin-1") if tracestate is not None else None
        parent = parse_traceparent(tp)
        if parent is not None and not parent.sampled:
            return self._unsampled_child(parent, clean_tracestate(state_str) if state_str else "")
        name = f"{method.decode('latin-1')} {target.split(b'?', 1)[0].decode('latin-1')}"
        return self.start_hop(name, tp, state_str, kind=kind)

    def _span_hop(self, name: str, parent: TraceParent | None, state: str, kind: SpanKind,
                  attributes: dict[str, Any] | None) -> Hop:
        """A sampled hop, child of `parent` when there is one; its SDK span is made later
        (`materialize`), with these ids and times."""
        rng = self._rng
        trace_id = int(parent.trace_id, 16) if parent is not None else rng.getrandbits(128) | 1
        span_id = rng.getrandbits(64) | 1
        deferred = _Deferred(name, parent, trace_id, span_id, kind,
                             {"mesh.service": self.service, **(attributes or {})})
        # The parent's flags with "sampled" set (its random flag, if any, stays true);
        # a trace started here: sampled and random.
        flags = (parent.flags | 1) & 0xFF if parent is not None else 1 | _RANDOM
        header = b"00-%032x-%016x-%02x" % (trace_id, span_id, flags)
        return Hop(deferred, header, state.encode("latin-1", "replace"), True, self.collector,
                   parent is None)

    def materialize(self, finished: list[_Deferred]) -> None:
        """Make the SDK spans of finished sampled hops; they reach the collector's
        `pending` through the provider's span processor, as any SDK span would."""
        ids = self._ids
        start_span = self.tracer.start_span
        for d in finished:
            # A root gets an empty context: a span current in the shipper's task must not
            # become its parent (and lend it its trace id).
            context = _EMPTY_CONTEXT
            parent = d.parent
            if parent is not None:
                remote = SpanContext(
                    trace_id=d.trace_id,
                    span_id=int(parent.parent_id, 16),
                    is_remote=True,
                    trace_flags=TraceFlags(parent.flags),
                )
                context = trace.set_span_in_context(NonRecordingSpan(remote))
            ids.trace_id, ids.span_id = d.trace_id, d.span_id
            span = start_span(d.name, context=context, kind=d.kind, attributes=d.attributes,
                              start_time=d.start_ns)
            if d.error:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=d.end_ns)


def span_record(span: ReadableSpan, service: str) -> SpanRecord:
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return SpanRecord(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{parent.span_id:016x}" if parent is not None else "",
        name=span.name,
        service=service,
        start_ns=span.start_time or 0,
        end_ns=span.end_time or 0,
        attrs={
            k: v
            for k, v in (span.attributes or {}).items()
            if isinstance(v, (str, int, float, bool))
        },
        error=span.status.status_code == StatusCode.ERROR,
    )


def encode_otlp(spans: list[ReadableSpan]) -> bytes:
    """OTLP/HTTP protobuf body (ExportTraceServiceRequest) for these spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    data: bytes = encode_spans(spans).SerializeToString()
    return data


async def post(url: str, body: bytes, content_type: str, timeout: float = 5.0) -> int:
    """One HTTP/1.1 POST on a fresh connection (http or https); returns the status."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"OTLP endpoint {url!r} is not an http(s):// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    with trio.fail_after(timeout):
        stream: trio.abc.Stream
        if parts.scheme == "https":
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname, port, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(parts.hostname, port)
        async with stream:
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nhost: {parts.netloc}\r\ncontent-type: {content_type}\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            head = b""
            while b"\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
    fields = head.split(b" ", 2)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


async def next_tick(origin: float, interval: float, tick: int) -> int:
    """Sleep until the first point of the grid `origin + k * interval` with k > `tick` that
    is not past yet, and return that k.

    The sidecar's periodic telemetry tasks share one origin so that their wakeups coincide
    and trio wakes once for all of them: idle, the wakeups themselves are what costs CPU
    (~0.25 ms each on a small VM), not the little work done in them. Points already past
    (a slow OTLP export) are skipped rather than caught up with in a burst."""
    k = max(tick + 1, math.floor((trio.current_time() - origin) / interval) + 1)
    await trio.sleep_until(origin + k * interval)
    return k


class SpanShipper:
    """Ships finished spans every `interval`: over NATS and/or OTLP/HTTP."""

    def __init__(
        self,
        tracer: HopTracer,
        *,
        bus: Bus | None = None,
        otlp_endpoint: str | None = None,
        interval: float = 0.5,
    ) -> None:
        self.tracer = tracer
        self.bus = bus
        self.otlp_url = otlp_endpoint.rstrip("/") + "/v1/traces" if otlp_endpoint else None
        self.interval = interval
        self.published = 0
        self.exported = 0
        self.export_errors = 0
        self.dropped = 0

    async def ship_once(self) -> None:
        collector = self.tracer.collector
        if self.bus is None and self.otlp_url is None:
            self.dropped += collector.discard()  # nowhere to send them (yet): not even made
            return
        shipped: list[ReadableSpan] = []  # for the one OTLP POST
        while True:
            spans = collector.take(_SHIP_CHUNK)
            bus = self.bus
            if bus is not None:
                subject = subjects.spans(self.tracer.service)
                for s in spans:
                    try:
                        bus.publish_nowait(subject, span_record(s, self.tracer.service))
                        self.published += 1
                    except (MeshError, trio.ClosedResourceError) as exc:
                        log.debug("span not published: %s", exc)
            if self.otlp_url is not None:
                shipped += spans
            if not collector.finished:
                break
            # A burst of sampled traffic: let requests run between chunks.
            await trio.lowlevel.checkpoint()
        if self.otlp_url is not None and shipped:
            try:
                status = await post(self.otlp_url, encode_otlp(shipped), "application/x-protobuf")
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                status = 0
                log.warning("OTLP export to %s failed: %s", self.otlp_url, exc)
            if 200 <= status < 300:
                self.exported += len(shipped)
            else:
                self.export_errors += 1

    async def run(self, *, origin: float | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ship at `origin + k * interval` (trio time; default: now)."""
        task_status.started()
        start = trio.current_time() if origin is None else origin
        tick = 0
        try:
            while True:
                tick = await next_tick(start, self.interval, tick)
                await self.ship_once()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.ship_once()
