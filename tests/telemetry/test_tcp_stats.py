"""Opaque TCP in the pure telemetry parts: the sidecar's TCP recorder, the batch schema
(optional `tcp` map per row), the aggregator's graph and `mesh top`'s table."""

from __future__ import annotations

import msgpack

from mesh.cli.top_cmd import render
from mesh.messages import GraphReply, encode
from mesh.stats import PairAgg, TcpAgg
from mesh.stats_graph import GraphState
from mesh.telemetry import build_batch, parse_batch
from sidecar.tcp_telemetry import TcpRecorder


def test_recorder_reports_live_bytes_once_and_refusals_only_from_the_destination() -> None:
    r = TcpRecorder()
    conn = r.open("source", "catalog", "stock", "v1")
    conn.sent.n += 100  # what the splice does per chunk
    conn.received.n += 40
    key = ("catalog", "stock", "v1")
    assert r.take()[key].as_tuple() == (1, 0, 100, 40, 0)  # live bytes, before the close
    conn.sent.n += 5
    r.close(conn)
    r.close(conn)  # closing twice counts once
    assert r.take()[key].as_tuple() == (0, 1, 5, 0, 0)
    assert r.take() == {}
    # The destination's view stays out of batches (the source counted the connection),
    # except refusals, which the source cannot tell from a closed connection.
    d = r.open("destination", "catalog", "stock", "v1")
    d.sent.n += 7
    r.deny("destination", "reviews", "stock", "v1")
    assert {k: v.as_tuple() for k, v in r.take().items()} == {
        ("reviews", "stock", "v1"): (0, 0, 0, 0, 1)}
    totals = r.totals()
    assert totals[("destination", "catalog", "stock", "v1")].as_tuple() == (1, 0, 7, 0, 0)
    assert totals[("source", "catalog", "stock", "v1")].as_tuple() == (1, 1, 105, 40, 0)


def test_batch_carries_tcp_rows_that_old_readers_can_skip() -> None:
    http = PairAgg()
    http.observe(200, "", 0.01, 10, 20)
    tcp_only = PairAgg()
    tcp_only.tcp = TcpAgg(opened=2, closed=1, sent=300, received=400, denied=1)
    msg = build_batch(namespace="default", service="catalog", instance="c-1", epoch="e", seq=1,
                      ts=1.0, interval=1.0,
                      pairs={("frontend", "catalog", "v1"): http,
                             ("catalog", "stock", "v1"): tcp_only})
    data = encode(msg)
    raw = msgpack.unpackb(data, strict_map_key=False)["b"]["pairs"]
    row = next(r for r in raw if r["dst"] == "stock")
    # What a raw NATS client reads (docs/telemetry.md): n = 0 and a `tcp` map.
    assert row["n"] == 0 and row["tcp"] == {"opened": 2, "closed": 1, "sent": 300,
                                            "received": 400, "denied": 1}
    assert "tcp" not in next(r for r in raw if r["dst"] == "catalog")
    parsed = parse_batch(data)
    assert {r.key: r.tcp for r in parsed.rows} == {("frontend", "catalog", "v1"): None,
                                                    ("catalog", "stock", "v1"): (2, 1, 300, 400, 1)}

    g = GraphState()
    assert g.ingest(parsed, 100.0)
    nodes, edges = g.graph("10s", 100.5)
    by = {(e["src"], e["dst"]): e for e in edges}
    assert nodes == ["catalog", "frontend", "stock"]
    assert by[("catalog", "stock")]["protocol"] == "tcp"
    assert by[("catalog", "stock")]["tcp_connections"] == 2
    assert by[("catalog", "stock")]["tcp_sent_bps"] == 300.0
    assert by[("catalog", "stock")]["tcp_denied"] == 1
    assert by[("frontend", "catalog")]["protocol"] == "http"
    assert g.totals[("catalog", "stock")].tcp is not None
    # The windows let TCP counts go again, like requests.
    _, edges = g.graph("10s", 200.0)
    assert edges == []

    table = render(GraphReply(replica="cp-1", ts=1.0, window="10s", nodes=nodes,
                              edges=list(by.values())))
    lines = table.splitlines()
    tcp_header = next(i for i, line in enumerate(lines) if line.startswith("SRC") and "CONN/S" in line)
    assert lines[tcp_header + 1].split()[:4] == ["catalog", "stock", "2.0", "2"]


def test_a_bad_tcp_map_is_a_bad_batch() -> None:
    import pytest

    from mesh.telemetry import BadBatch

    agg = PairAgg()
    agg.tcp = TcpAgg(opened=1)
    msg = build_batch(namespace="default", service="a", instance="a-1", epoch="e", seq=1,
                      ts=1.0, interval=1.0, pairs={("a", "b", ""): agg})
    env = msgpack.unpackb(encode(msg), strict_map_key=False)
    env["b"]["pairs"][0]["tcp"] = [1, 2]
    with pytest.raises(BadBatch, match="'tcp' must be a map"):
        parse_batch(msgpack.packb(env))
    env["b"]["pairs"][0]["tcp"] = {"opened": -1}
    with pytest.raises(BadBatch, match="negative"):
        parse_batch(msgpack.packb(env))
