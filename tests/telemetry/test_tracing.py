"""Trace context, spans per hop (OpenTelemetry SDK), spans over NATS and OTLP/HTTP, access logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from actors.runtime import ActorContext
from actors.telemetry import TelemetryActor
from bus import subjects
from bus.client import connect
from bus.server import NatsServer
from mesh.errors import ConfigError
from mesh.messages import AccessLogEntry
from sidecar.accesslog import FIELDS, AccessLog, entry, format_line
from sidecar.tracing import (
    HopTracer,
    SpanShipper,
    clean_tracestate,
    format_traceparent,
    parse_traceparent,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_traceparent_parse_and_format() -> None:
    p = parse_traceparent(TP)
    assert p is not None and p.sampled
    assert (p.trace_id, p.parent_id) == ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    assert format_traceparent(p.trace_id, p.parent_id, p.flags) == TP
    for bad in (
        None,
        "",
        "garbage",
        TP.upper(),
        "ff" + TP[2:],
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        TP + "-extra",  # version 00 has exactly four fields
    ):
        assert parse_traceparent(bad) is None, bad
    # A future version may carry more fields; the first four still count.
    future = parse_traceparent("cc" + TP[2:] + "-what-ever")
    assert future is not None and future.trace_id == p.trace_id


def test_tracestate_is_forwarded_cleaned_and_bounded() -> None:
    assert clean_tracestate("a=1, b=2,,junk") == "a=1,b=2"
    long = ",".join(f"k{i}={'x' * 30}" for i in range(40))
    out = clean_tracestate(long)
    assert len(out) <= 512 and out.count("=") <= 32 and out.startswith("k0=")
    assert clean_tracestate(None) == ""


def _three_hops(tracers: list[HopTracer]) -> list[Any]:
    hops = []
    parent, state = None, "vendor=abc"
    for i, t in enumerate(tracers):
        hop = t.start_hop(f"GET /hop{i}", parent, state)
        hops.append(hop)
        parent, state = hop.traceparent, hop.tracestate
    for hop in reversed(hops):
        hop.finish(200)
    return hops


def test_three_hops_make_parent_child_spans_with_one_trace_id() -> None:
    tracers = [HopTracer(s, sample_ratio=1.0) for s in ("frontend", "backend", "db")]
    hops = _three_hops(tracers)
    spans = [t.collector.take() for t in tracers]
    assert [len(s) for s in spans] == [1, 1, 1]
    a, b, c = (s[0] for s in spans)
    ctx_a, ctx_b, ctx_c = (x.get_span_context() for x in (a, b, c))
    assert ctx_a is not None and ctx_b is not None and ctx_c is not None
    assert {ctx_a.trace_id, ctx_b.trace_id, ctx_c.trace_id} == {int(hops[0].trace_id, 16)}
    assert a.parent is None
    assert b.parent is not None and b.parent.span_id == ctx_a.span_id
    assert c.parent is not None and c.parent.span_id == ctx_b.span_id
    assert hops[2].tracestate == ""  # the first hop started the trace: nothing to forward
    parsed = [parse_traceparent(h.traceparent) for h in hops]
    assert all(p is not None and p.sampled for p in parsed)


def test_sampling_is_decided_once_and_followed_downstream() -> None:
    first = HopTracer("frontend", sample_ratio=0.0)
    rest = [HopTracer(s, sample_ratio=1.0) for s in ("backend", "db")]
    hops = _three_hops([first, *rest])
    assert len({h.trace_id for h in hops}) == 1  # propagated even when not sampled
    assert all(parse_traceparent(h.traceparent) is not None for h in hops)
    # Unsampled hops record nothing, so they forward the parent they got unchanged.
    assert {h.traceparent for h in hops} == {hops[0].traceparent}
    assert not any(h.sampled for h in hops)
    assert all(not t.collector.take() for t in (first, *rest))
    # An incoming sampled parent is followed even at ratio 0, and its tracestate forwarded.
    hop = first.start_hop("GET /", TP, "x=1,y=2")
    hop.finish(503)
    (span,) = first.collector.take()
    assert hop.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and hop.tracestate == "x=1,y=2"
    assert not span.status.is_ok
    with pytest.raises(ConfigError):
        HopTracer("x", sample_ratio=2.0)


async def otlp_collector(
    received: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        head, body = buf.split(b"\r\n\r\n", 1)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
        assert head.startswith(b"POST /v1/traces ")
        received.append(body)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_spans_reach_mesh_trace_over_nats_and_an_otlp_collector(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    received: list[bytes] = []
    actor = TelemetryActor(metrics_port=None)
    async with (
        connect(url, name="cp") as cp_bus,
        connect(url, name="sidecars") as bus,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(actor.run, ActorContext(bus=cp_bus, replica="cp-1"))
        port = await nursery.start(otlp_collector, received)
        tracers = [HopTracer(s, sample_ratio=1.0) for s in ("frontend", "backend", "db")]
        shippers = [
            SpanShipper(t, bus=bus, otlp_endpoint=f"http://127.0.0.1:{port}", interval=0.05)
            for t in tracers
        ]
        for s in shippers:
            await nursery.start(s.run)
        hops = _three_hops(tracers)
        trace_id = hops[0].trace_id
        with trio.fail_after(10):
            while len(actor.spans.get(trace_id)) < 3 or len(received) < 3:
                await trio.sleep(0.02)

        out = await trio.run_process(
            [sys.executable, "-m", "mesh", "trace", "--nats", url, hops[1].traceparent, "--json"],
            capture_stdout=True,
            capture_stderr=True,
        )
        spans = json.loads(out.stdout)["spans"]
        assert [s["service"] for s in spans] == ["frontend", "backend", "db"]
        assert {s["trace_id"] for s in spans} == {trace_id}
        assert spans[0]["parent_id"] == ""
        assert spans[1]["parent_id"] == spans[0]["span_id"]
        assert spans[2]["parent_id"] == spans[1]["span_id"]
        tree = await trio.run_process(
            [sys.executable, "-m", "mesh", "trace", "--nats", url, trace_id],
            capture_stdout=True,
        )
        text = tree.stdout.decode().splitlines()
        assert text[0] == f"trace {trace_id}: 3 spans"
        assert [line.index(":") - len(line.lstrip()) for line in text[1:]] and text[3].startswith(
            "      db: GET /hop2"
        )

        otlp_trace_ids: set[str] = set()
        services: set[str] = set()
        for body in received:
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                services.update(
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                )
                for ss in rs.scope_spans:
                    otlp_trace_ids.update(s.trace_id.hex() for s in ss.spans)
        assert otlp_trace_ids == {trace_id}
        assert services == {"frontend", "backend", "db"}
        assert all(s.exported == 1 and s.export_errors == 0 for s in shippers)
        nursery.cancel_scope.cancel()


async def test_access_log_lines_are_json_with_the_listed_fields(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    path = tmp_path / "access.log"
    async with connect(nats_server.url, name="al") as bus:
        async with bus.subscribe(subjects.accesslog("frontend")) as sub:
            alog = AccessLog(path, service="frontend", bus=bus)
            for i, status in enumerate((200, 503, 0)):
                alog.record(
                    start_time=1_700_000_000.5 + i,
                    method="GET",
                    path=f"/users/{i}?q=1",
                    authority="backend",
                    status=status,
                    response_flags="UF" if status == 0 else "",
                    duration=0.0123,
                    upstream="127.0.0.1:8080",
                    source="spiffe://mesh.local/ns/default/sa/frontend",
                    request_id=f"req-{i}",
                    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
                    rx_bytes=10,
                    tx_bytes=2048,
                )
            alog.close()
            with trio.fail_after(5):
                got = [d.body async for d in _take(sub, 3)]
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    for r in records:
        assert tuple(r) == FIELDS
    assert records[0]["start_time"] == "2023-11-14T22:13:20.500Z"
    assert [r["status"] for r in records] == [200, 503, 0]
    assert records[2]["response_flags"] == "UF" and records[1]["duration_ms"] == 12.3
    assert all(isinstance(g, AccessLogEntry) for g in got)
    assert [g.entry["request_id"] for g in got if isinstance(g, AccessLogEntry)] == [
        "req-0",
        "req-1",
        "req-2",
    ]
    with pytest.raises(ConfigError):
        AccessLog(tmp_path / "missing-dir" / "x.log")


async def _take(sub: Any, n: int) -> Any:
    i = 0
    async for d in sub:
        yield d
        i += 1
        if i >= n:
            return


@settings(max_examples=100, deadline=None)
@given(
    st.text(max_size=40),
    st.integers(min_value=0, max_value=999),
    st.floats(min_value=0, max_value=1e4, allow_nan=False),
    st.floats(min_value=0, max_value=4e9),
)
def test_the_fast_line_formatter_writes_what_json_dumps_would(
    text: str, status: int, duration: float, start: float
) -> None:
    rec = entry(
        start_time=start,
        method=text,
        path=text,
        authority=text,
        status=status,
        response_flags=text,
        duration=duration,
        upstream=text,
        source=text,
        request_id=text,
        trace_id=text,
    )
    line = format_line(rec)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == rec
    assert json.loads(line) == json.loads(json.dumps(rec))


@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize("incoming", [
    None, TP, TP[:-2] + "00",
    TP[:-2] + "02",  # an unknown flag bit, not sampled: kept as received
    "00-" + "0" * 32 + TP[35:-2] + "00",  # all-zero trace id: invalid, a new trace
    TP[:36] + "0" * 16 + "-00",  # all-zero parent id: invalid
    TP[:-2].upper() + "00",  # upper-case hex: invalid
    "ff" + TP[2:-2] + "00",  # version ff: invalid
    "01" + TP[2:-2] + "00-later",  # a later version may add fields
    TP[:-2] + "00-later",  # version 00 may not
])
def test_request_hop_decides_like_start_hop(ratio: float, incoming: str | None) -> None:
    """The proxy's bytes-in fast path takes the same decisions and draws the same ids."""
    import random

    from opentelemetry.trace import SpanKind

    a = HopTracer("svc", sample_ratio=ratio, rng=random.Random(7))
    b = HopTracer("svc", sample_ratio=ratio, rng=random.Random(7))
    slow = a.start_hop("GET /p", incoming, "k=v" if incoming else None, kind=SpanKind.CLIENT)
    fast = b.start_request_hop(b"GET", b"/p?q=1", incoming.encode() if incoming else None,
                               b"k=v" if incoming else None, SpanKind.CLIENT)
    assert (fast.sampled, fast.tracestate, fast.new) == (slow.sampled, slow.tracestate, slow.new)
    if incoming is not None and not fast.new:  # a new trace's ids come from a batch draw
        assert (fast.trace_id, fast.span_id, fast.traceparent) == (
            slow.trace_id, slow.span_id, slow.traceparent)
    assert parse_traceparent(fast.traceparent) is not None
    fast.finish(200)
    slow.finish(200)
    names = [s.name for s in b.collector.take()]
    assert names == (["GET /p"] if fast.sampled else [])


def test_a_sampled_hops_sdk_span_has_the_ids_and_times_it_had_on_the_request_path() -> None:
    """The SDK span of a sampled hop is made when the shipper takes it, not on the
    request path: it must still carry the ids sent upstream and the hop's own times."""
    import time

    from opentelemetry.trace import SpanKind

    t = HopTracer("svc", sample_ratio=1.0)
    before = time.time_ns()
    hop = t.start_request_hop(b"POST", b"/orders?id=3", TP.encode(), None, SpanKind.SERVER)
    time.sleep(0.01)
    hop.finish(504, "UT", **{"mesh.upstream": "10.0.0.1:80"})
    after = time.time_ns()
    assert t.collector.pending == []  # nothing made yet
    (span,) = t.collector.take()
    ctx = span.get_span_context()
    assert ctx is not None and span.parent is not None
    assert f"{ctx.trace_id:032x}" == hop.trace_id == TP[3:35]
    assert f"{ctx.span_id:016x}" == hop.span_id != TP[36:52]
    assert span.parent.span_id == int(TP[36:52], 16) and span.parent.is_remote
    assert span.name == "POST /orders" and span.kind == SpanKind.SERVER
    assert span.start_time is not None and span.end_time is not None
    assert before <= span.start_time < span.start_time + 10_000_000 <= span.end_time <= after
    assert span.attributes is not None and dict(span.attributes) == {
        "mesh.service": "svc",
        "http.response.status_code": 504,
        "mesh.response_flags": "UT",
        "mesh.upstream": "10.0.0.1:80",
    }
    assert not span.status.is_ok
    assert t.collector.take() == []


def test_new_traces_drawn_in_batches_are_distinct_valid_and_sampled_at_the_ratio() -> None:
    import random

    from opentelemetry.trace import SpanKind

    t = HopTracer("svc", sample_ratio=0.25, rng=random.Random(3))
    hops = [t.start_request_hop(b"GET", b"/", None, None, SpanKind.CLIENT) for _ in range(4000)]
    assert all(h.new for h in hops)
    parsed = [parse_traceparent(h.traceparent) for h in hops]
    assert all(p is not None for p in parsed)
    assert len({h.trace_id for h in hops}) == len({h.span_id for h in hops}) == 4000
    sampled = sum(h.sampled for h in hops)
    assert 850 <= sampled <= 1150  # 1000 expected; sigma ~27
    assert all(p is not None and p.sampled == h.sampled for p, h in zip(parsed, hops, strict=True))


def test_sampled_hops_keep_the_w3c_flags_the_sdk_span_has() -> None:
    """Sent flags and the SDK span's flags agree: sampled, and the level-2 random-trace-id
    flag for traces started here (kept from a parent that had it)."""
    from opentelemetry import trace as otel_trace
    from opentelemetry.trace import SpanKind

    t = HopTracer("svc", sample_ratio=1.0)
    root = t.start_request_hop(b"GET", b"/", None, None, SpanKind.CLIENT)
    child = t.start_request_hop(b"GET", b"/", (TP[:-2] + "03").encode(), None, SpanKind.SERVER)
    assert root.traceparent.endswith("-03") and child.traceparent.endswith("-03")
    assert HopTracer("x", sample_ratio=0.0).start_request_hop(
        b"GET", b"/", None, None, SpanKind.CLIENT).traceparent.endswith("-02")
    # A span current in the shipper's task must not adopt a root made there.
    other = t.tracer.start_span("unrelated")
    root.finish(200)
    child.finish(200)
    root.finish(200)  # a second finish records nothing more
    with otel_trace.use_span(other):
        spans = t.collector.take()
    assert len(spans) == 2
    by_id = {f"{s.get_span_context().span_id:016x}": s for s in spans}  # type: ignore[union-attr]
    for hop in (root, child):
        ctx = by_id[hop.span_id].get_span_context()
        assert ctx is not None and f"{ctx.trace_id:032x}" == hop.trace_id
        assert f"{int(ctx.trace_flags):02x}" == hop.traceparent[-2:]
    assert by_id[root.span_id].parent is None


async def test_spans_with_nowhere_to_go_are_dropped_without_being_made() -> None:
    from opentelemetry.trace import SpanKind

    from sidecar.tracing import SpanShipper

    t = HopTracer("svc", sample_ratio=1.0)
    for _ in range(600):
        t.start_request_hop(b"GET", b"/", None, None, SpanKind.CLIENT).finish(200)
    made: list[int] = []
    materialize = t.materialize
    t.collector._materialize = lambda f: (made.append(len(f)), materialize(f))  # type: ignore[assignment]
    shipper = SpanShipper(t)  # no bus, no OTLP endpoint
    await shipper.ship_once()
    assert shipper.dropped == 600 and made == [] and not t.collector.finished
    # With somewhere to go, they are made in chunks (the shipper checkpoints between them).
    for _ in range(600):
        t.start_request_hop(b"GET", b"/", None, None, SpanKind.CLIENT).finish(200)
    assert len(t.collector.take(256)) == 256 and len(t.collector.finished) == 344
    assert made == [256]


def test_span_store_dedupes_per_service_so_a_callee_cannot_pre_empt_its_callers_span() -> None:
    from actors.telemetry import SpanStore
    from mesh.messages import SpanRecord

    def rec(service: str, name: str) -> SpanRecord:
        return SpanRecord(trace_id="a" * 32, span_id="b" * 16, parent_id="", name=name,
                          service=service, start_ns=1, end_ns=2, attrs={}, error=False)

    store = SpanStore()
    store.add(rec("backend", "forged"))  # the callee ships its caller's span id first
    store.add(rec("frontend", "GET /"))
    store.add(rec("frontend", "again"))  # a resend of the same span: kept once
    assert sorted((s["service"], s["name"]) for s in store.get("a" * 32)) == [
        ("backend", "forged"), ("frontend", "GET /")]


def test_mesh_tap_lines_show_request_data_escaped_and_the_publishing_service() -> None:
    from mesh.cli.tap_cmd import line

    entry = {"start_time": "t", "source": "frontend", "authority": "backend\r\nX: 1",
             "method": "GET", "path": "/\x1b[2J", "status": 200, "duration_ms": 1.5,
             "response_flags": "", "upstream": "", "request_id": "r", "trace_id": "t"}
    out = line(entry, "backend")
    assert out.startswith("[backend] t frontend -> backend\\r\\nX: 1 GET /\\x1b[2J 200")
    assert out.isprintable()
