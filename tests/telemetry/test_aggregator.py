"""Simulated sidecars (recorders + publishers on their own bus connections) feeding real
aggregator actors over a real nats-server."""

from __future__ import annotations

from typing import Any

import trio
from telemetry_helpers import CHAIN, count_samples, http_get, sample, simulate

from actors.runtime import ActorContext
from actors.telemetry import TelemetryActor
from bus import subjects
from bus.client import Bus, connect
from bus.errors import BusTimeout
from bus.server import NatsServer
from mesh.messages import GoldenSummary, GraphQuery, GraphReply
from sidecar.telemetry import Recorder, TelemetryCollector, TelemetryPublisher


async def graph(bus: Bus, window: str = "1m") -> GraphReply:
    # A query routed to a replica that just stopped gets no answer: ask again.
    while True:
        try:
            return await bus.request(
                subjects.GRAPH_QUERY, GraphQuery(window=window), GraphReply, timeout=0.5
            )
        except BusTimeout:
            continue


def edges_of(reply: GraphReply) -> dict[tuple[str, str], dict[str, Any]]:
    return {(e["src"], e["dst"]): e for e in reply.edges}


async def wait_counts(bus: Bus, scale: int) -> GraphReply:
    with trio.fail_after(10):
        while True:
            reply = await graph(bus)
            edges = edges_of(reply)
            if all(edges.get((s, d), {}).get("requests") == n * scale for s, d, _, n, _ in CHAIN):
                return reply
            await trio.sleep(0.05)


async def test_aggregator_merges_sidecar_batches_into_golden_signals(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    recorders = {s: Recorder("default", s, f"{s}-1") for s in ("frontend", "backend")}
    actors = [TelemetryActor(metrics_port=0, publish_interval=0.2) for _ in range(2)]
    async with (
        connect(url, name="agg-1") as bus1,
        connect(url, name="agg-2") as bus2,
        connect(url, name="sidecars") as sidecar_bus,
        connect(url, name="client") as client,
        trio.open_nursery() as nursery,
    ):
        scopes = []
        for actor, bus, name in ((actors[0], bus1, "cp-1"), (actors[1], bus2, "cp-2")):
            scope = trio.CancelScope()
            scopes.append(scope)

            async def run_actor(
                actor: TelemetryActor = actor,
                bus: Bus = bus,
                name: str = name,
                scope: trio.CancelScope = scope,
                *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with scope:
                    await actor.run(ActorContext(bus=bus, replica=name), task_status=task_status)

            await nursery.start(run_actor)
        for r in recorders.values():
            await nursery.start(TelemetryPublisher(r, sidecar_bus, interval=0.1).run)

        async with client.subscribe(subjects.golden("frontend", "backend")) as golden_sub:
            simulate(recorders)
            reply = await wait_counts(client, 1)
            edges = edges_of(reply)
            assert edges[("frontend", "backend")]["error_rate"] == 0.1
            assert edges[("backend", "db")]["error_rate"] == 0.0
            assert 2.0 < edges[("frontend", "backend")]["p50_ms"] < 3.5
            assert reply.nodes == ["backend", "db", "frontend"]

            with trio.fail_after(5):
                async for d in golden_sub:
                    assert isinstance(d.body, GoldenSummary)
                    if d.body.windows["1m"]["requests"] == 100:
                        assert d.body.windows["1m"]["error_rate"] == 0.1
                        break

        # Both replicas hold the whole graph (no queue group on ingest).
        for actor in actors:
            state_edges = dict(actor.state.graph("1m", trio.current_time())[1][0])
            assert state_edges["requests"] in (50, 100)
            assert actor.state.totals[("frontend", "backend")].requests == 100

        # Mesh-wide /metrics.
        status, body = await http_get(actors[0].metrics_port, "/metrics")
        text = body.decode()
        assert status == 200
        edge = {"source_service": "frontend", "destination_service": "backend"}
        assert sample(text, "mesh_edge_requests_total", **edge) == 100
        assert sample(text, "mesh_edge_errors_total", **edge) == 10
        assert sample(text, "mesh_edge_request_duration_seconds_count", **edge) == 100
        assert sample(text, "mesh_edge_error_ratio", **edge, window="10s") == 0.1
        assert sample(text, "mesh_telemetry_batches_total") is not None

        # Failover: one replica goes away; the other answers with the same counts, and
        # new traffic is counted once.
        scopes[0].cancel()
        simulate(recorders)
        reply = await wait_counts(client, 2)
        assert reply.replica == "cp-2"
        assert actors[1].state.stats.duplicates == 0

        # A batch delivered twice (a resend) is counted once.
        async with client.subscribe_raw(subjects.TELEMETRY_ALL) as raw:
            recorders["backend"].record("backend", "db", "v2", 200, "", 0.001)
            with trio.fail_after(5):
                async for raw_d in raw:
                    await client.publish(raw_d.subject, raw_d.body)
                    break
        # A batch off the schema is dropped and counted, and ingest goes on.
        await client.publish(subjects.telemetry("default", "x", "x-1"), b"\x93not a batch")
        with trio.fail_after(5):
            while actors[1].state.stats.duplicates < 1 or actors[1].state.stats.bad < 1:
                await trio.sleep(0.02)
        assert actors[1].state.totals[("backend", "db")].requests == 101
        nursery.cancel_scope.cancel()


async def test_sidecar_metrics_families_follow_prometheus_conventions() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    r = Recorder("default", "frontend", "frontend-1")
    simulate({"frontend": r, "backend": r})
    r.record("frontend", "backend", "v1", 0, "UF", 0.001)
    r.tcp_open("backend")
    r.tcp_close("backend", 10, 20)
    r.retry("frontend", "backend", "v1")
    r.ejection("backend")
    r.overflow("backend")
    r.config_version = "v42"
    r.cert_not_after = 2000.0
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(r, clock=lambda: 1000.0))
    text = generate_latest(registry).decode()
    pair = {
        "source_service": "frontend",
        "destination_service": "backend",
        "destination_version": "v1",
    }
    req = "mesh_requests_total"
    assert sample(text, req, **pair, response_code="200", response_flags="") == 90
    assert sample(text, req, **pair, response_code="503", response_flags="") == 10
    assert sample(text, req, **pair, response_code="0", response_flags="UF") == 1
    assert sample(text, "mesh_request_duration_seconds_count", **pair) == 101
    assert sample(text, "mesh_request_duration_seconds_bucket", **pair, le="+Inf") == 101
    assert sample(text, "mesh_request_duration_seconds_bucket", **pair, le="0.0016") == 1
    assert sample(text, "mesh_request_duration_seconds_bucket", **pair, le="0.0032") == 101
    assert sample(text, "mesh_request_bytes_total", **pair) == 10000
    assert sample(text, "mesh_response_bytes_total", **pair) == 20000
    tcp_pair = {"reporter": "source", **pair, "destination_version": ""}
    for name, value in (
        ("mesh_tcp_connections_opened_total", 1),
        ("mesh_tcp_connections_closed_total", 1),
        ("mesh_tcp_received_bytes_total", 10),
        ("mesh_tcp_sent_bytes_total", 20),
        ("mesh_tcp_connections_denied_total", 0),
    ):
        assert sample(text, name, **tcp_pair) == value, name
    for name in (
        "mesh_retries_total",
        "mesh_outlier_ejections_total",
        "mesh_circuit_breaker_overflows_total",
    ):
        assert sample(text, name, destination_service="backend") is not None, name
    assert sample(text, "mesh_config_info", version="v42") == 1
    assert sample(text, "mesh_certificate_expiry_seconds") == 1000
    # 20 buckets + Inf per pair: bounded series.
    assert count_samples(text, "mesh_request_duration_seconds_bucket", **pair) == 21
    # Taking the interval keeps the cumulative totals.
    r.take()
    text = generate_latest(registry).decode()
    assert sample(text, "mesh_request_duration_seconds_count", **pair) == 101
