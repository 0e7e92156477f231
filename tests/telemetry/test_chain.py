"""A simulated 3-service chain through `SidecarTelemetry` (the one object the sidecar
wires in): metrics, batches to a real aggregator, one trace, access-log lines."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from prometheus_client import CollectorRegistry, generate_latest
from telemetry_helpers import sample

from actors.runtime import ActorContext
from actors.telemetry import TelemetryActor
from bus import subjects
from bus.client import connect
from bus.server import NatsServer
from mesh.messages import GraphQuery, GraphReply
from sidecar.telemetry import SidecarTelemetry, TelemetryOptions

CHAIN = ("frontend", "backend", "db")


async def test_a_chain_of_hops_gives_counts_one_trace_and_access_logs(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    actor = TelemetryActor(metrics_port=None)
    async with (
        connect(url, name="cp") as cp_bus,
        connect(url, name="sidecars") as bus,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(actor.run, ActorContext(bus=cp_bus, replica="cp-1"))
        tels = {
            s: SidecarTelemetry(
                s,
                f"{s}-1",
                TelemetryOptions(
                    interval=0.1,
                    trace_sample_ratio=1.0,
                    access_log=str(tmp_path / f"{s}.log"),
                    access_log_publish=True,
                ),
                bus,
            )
            for s in CHAIN
        }
        registries = {}
        for s, tel in tels.items():
            registries[s] = CollectorRegistry()
            tel.register(registries[s])
            await nursery.start(tel.run)

        trace_ids = []
        async with bus.subscribe(subjects.ACCESSLOG_ALL) as logs:
            for i in range(20):
                fail = i % 4 == 0  # db fails 1 request in 4; backend passes the 503 on
                traceparent = None
                hops = []
                for s in CHAIN:
                    hop = tels[s].begin(f"GET /{s}", traceparent, None)
                    hops.append(hop)
                    traceparent = hop.traceparent
                trace_ids.append(hops[0].trace_id)
                for k in (2, 1, 0):
                    src = CHAIN[k - 1] if k else "unknown"
                    status = 503 if fail and k > 0 else 200
                    duration = 0.001 * (3 - k)
                    # Counted once, as the proxy does: by the caller's sidecar, and by the
                    # first sidecar for the caller outside the mesh (source "unknown"); the
                    # aggregator refuses a destination's rows about in-mesh callers.
                    if k:
                        tels[src].recorder.record(src, CHAIN[k], "v1", status, "", duration,
                                                  10, 100)
                    tels[CHAIN[k]].end(
                        hops[k],
                        count=not k,
                        src=src,
                        dst=CHAIN[k],
                        dst_version="v1",
                        status=status,
                        flags="",
                        start_time=1.7e9 + i,
                        duration=duration,
                        rx_bytes=10,
                        tx_bytes=100,
                        method="GET",
                        path=f"/{CHAIN[k]}",
                        authority=CHAIN[k],
                        upstream="127.0.0.1:8080",
                        request_id=f"r{i}",
                    )
            with trio.fail_after(5):
                published = 0
                async for _ in logs:
                    published += 1
                    if published == 60:
                        break

        with trio.fail_after(10):
            while True:
                reply = await cp_bus.request(
                    subjects.GRAPH_QUERY, GraphQuery(window="1m"), GraphReply
                )
                edges = {(e["src"], e["dst"]): e for e in reply.edges}
                if len(edges) == 3 and all(e["requests"] == 20 for e in edges.values()):
                    break
                await trio.sleep(0.05)
        assert edges[("unknown", "frontend")]["error_rate"] == 0.0
        assert edges[("frontend", "backend")]["error_rate"] == 0.25
        assert edges[("backend", "db")]["error_rate"] == 0.25

        text = generate_latest(registries["frontend"]).decode()  # the caller counts
        pair = {
            "source_service": "frontend",
            "destination_service": "backend",
            "destination_version": "v1",
        }
        assert (
            sample(text, "mesh_requests_total", **pair, response_code="503", response_flags="") == 5
        )
        assert (
            sample(text, "mesh_requests_total", **pair, response_code="200", response_flags="")
            == 15
        )

        with trio.fail_after(10):
            while len(actor.spans.get(trace_ids[0])) < 3:
                await trio.sleep(0.05)
        spans = actor.spans.get(trace_ids[0])
        assert [s["service"] for s in spans] == list(CHAIN)
        assert spans[1]["parent_id"] == spans[0]["span_id"]
        assert spans[2]["parent_id"] == spans[1]["span_id"]
        nursery.cancel_scope.cancel()

    for s in CHAIN:
        lines = [json.loads(line) for line in (tmp_path / f"{s}.log").read_text().splitlines()]
        assert len(lines) == 20
        assert [line["trace_id"] for line in lines] == trace_ids


async def test_mesh_tap_prints_live_request_lines(nats_server: NatsServer) -> None:
    import io
    import subprocess
    import sys

    from sidecar.accesslog import AccessLog

    async with connect(nats_server.url, name="sidecar") as bus:
        alog = AccessLog(io.StringIO(), service="frontend", bus=bus)
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mesh", "tap", "frontend", "--nats", nats_server.url, "-n", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            with trio.fail_after(20):
                i = 0
                while proc.poll() is None:
                    alog.record(
                        start_time=1.7e9,
                        method="GET",
                        path=f"/p{i}",
                        authority="backend",
                        status=200,
                        response_flags="",
                        duration=0.002,
                        source="frontend",
                        request_id=f"r{i}",
                    )
                    alog.flush()
                    i += 1
                    await trio.sleep(0.1)
            assert proc.stdout is not None
            out = (await proc.stdout.receive_some(65536)).decode().splitlines()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and len(out) == 2
    assert " frontend -> backend GET /p" in out[0] and " 200 2.0ms " in out[0]


async def test_sidecar_telemetry_owns_its_connection_and_keeps_counts_while_away(
    nats_server: NatsServer,
) -> None:
    actor = TelemetryActor(metrics_port=None)
    tel = SidecarTelemetry(
        "frontend", "frontend-9", TelemetryOptions(interval=0.1), nats=[nats_server.url]
    )
    # Requests before any bus exists are kept, not lost.
    for status in (200, 200, 500):
        hop = tel.begin("GET /", None, None)
        tel.end(
            hop,
            src="frontend",
            dst="backend",
            dst_version="",
            status=status,
            flags="",
            start_time=1.7e9,
            duration=0.001,
            rx_bytes=0,
            tx_bytes=0,
        )
    async with connect(nats_server.url, name="cp") as cp_bus, trio.open_nursery() as nursery:
        await nursery.start(actor.run, ActorContext(bus=cp_bus, replica="cp-1"))
        await nursery.start(tel.run)
        with trio.fail_after(10):
            while actor.state.totals.get(("frontend", "backend")) is None:
                await trio.sleep(0.05)
        agg = actor.state.totals[("frontend", "backend")]
        assert (agg.requests, agg.errors) == (3, 1)
        nursery.cancel_scope.cancel()
    assert tel.bus is None  # detached when its connection closed
