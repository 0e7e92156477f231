"""The demo topology end to end: real apps, real sidecars, real NATS, `mesh load`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from deploy.topology import demo_topology_path, load_topology
from deploy.topology_plan import make_plan
from mesh.processes import terminate
from mesh.snapshot import Snapshot

MESH = [sys.executable, "-m", "mesh"]


async def read_ready(proc: trio.Process, timeout: float = 60) -> dict[str, object]:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while True:
            chunk = await proc.stdout.receive_some(65536)
            assert chunk, f"exited before ready: {buf.decode()}"
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b'{"event": "ready"'):
                    info: dict[str, object] = json.loads(line)
                    return info


async def get(port: int, host: str, path: str) -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    return raw


def body_of(raw: bytes) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return body


async def port_open(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


def test_demo_plan_gives_every_sidecar_a_valid_snapshot() -> None:
    counter = iter(range(30000, 31000))
    plan = make_plan(load_topology(demo_topology_path()), lambda: next(counter))
    snaps = {i.name: Snapshot.from_dict(i.snapshot) for i in plan.instances if i.snapshot}
    assert set(snaps) == {"frontend-v1-1", "catalog-v1-1", "catalog-v2-1", "ratings-v1-1", "stock-v1-1", "ingress"}
    catalog = snaps["frontend-v1-1"].clusters[0]
    assert catalog.name == "catalog" and {name for name, _ in catalog.subsets} == {"v1", "v2"}
    assert [t.name for t in snaps["catalog-v2-1"].tcp] == ["stock"]
    # stock has a sidecar whose inbound is opaque TCP; callers reach it, not the app.
    stock = next(i for i in plan.instances if i.name == "stock-v1-1")
    assert snaps["stock-v1-1"].inbound.tcp is not None
    stock_cluster = snaps["catalog-v2-1"].cluster("stock")
    assert stock_cluster is not None and [e.port for e in stock_cluster.subsets[0][1]] == [stock.inbound_port]


async def test_demo_serves_through_the_mesh_and_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))  # the CLI uses `mesh up`'s admin user
    proc = await trio.lowlevel.open_process(
        [*MESH, "up", "--demo", "--nats-port", "0", "--ingress-port", "0",
         "--state-dir", str(tmp_path), "--ready-line"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        info = await read_ready(proc)
        topo = info["topology"]
        assert isinstance(topo, dict)
        ingress = topo["ingress"]
        load = await trio.run_process(
            [*MESH, "load", f"http://127.0.0.1:{ingress}/", "-n", "200", "-c", "4", "-d", "30", "--json"],
            capture_stdout=True, check=False,
        )  # fmt: skip
        summary = json.loads(load.stdout)
        assert summary["statuses"] == {"200": 200}, summary
        assert load.returncode == 0

        # catalog v2 calls ratings (HTTP) and stock (opaque TCP) through its own sidecar.
        v2 = topo["instances"]["catalog-v2-1"]
        body = body_of(await get(v2["inbound"], "catalog", "/items"))
        assert body["version"] == "v2"
        assert [(i["sku"], i["stars"], i["stock"]) for i in body["items"]] == [("tea", 5, 21), ("mug", 4, 21)]

        # The sidecars' telemetry reaches the aggregator: every HTTP edge of the demo shows up.
        nats = info["nats"][0]  # type: ignore[index]
        edges: dict[tuple[str, str], int] = {}
        tcp_edges: dict[tuple[str, str], dict[str, Any]] = {}
        def complete(e: dict[tuple[str, str], int]) -> bool:  # batches arrive once a second
            wanted = (("ingress", "frontend"), ("frontend", "catalog"))
            return (all(e.get(k, 0) >= 200 for k in wanted) and e.get(("catalog", "ratings"), 0) >= 1
                    and ("catalog", "stock") in tcp_edges)

        with trio.fail_after(30):
            while not complete(edges):
                top = await trio.run_process(
                    [*MESH, "top", "--once", "--json", "--nats", nats], capture_stdout=True, check=False
                )
                if top.returncode == 0:
                    graph = json.loads(top.stdout)["edges"]
                    edges = {(e["src"], e["dst"]): e["requests"] for e in graph}
                    tcp_edges = {(e["src"], e["dst"]): e for e in graph if e["protocol"] == "tcp"}
                await trio.sleep(0.5)
        # The opaque TCP edge, through catalog's and stock's sidecars, with real traffic.
        stock_edge = tcp_edges[("catalog", "stock")]
        assert stock_edge["tcp_connections"] >= 1
        assert stock_edge["tcp_sent_bps"] > 0 and stock_edge["tcp_received_bps"] > 0
        assert edges[("ingress", "frontend")] == 200
        assert edges[("frontend", "catalog")] == 200
        assert edges[("catalog", "ratings")] >= 1

        # The topology's routes live in the control plane: a canary shift reaches the sidecars.
        shift = await trio.run_process(
            [*MESH, "route", "weights", "catalog", "v1=0", "v2=100", "--wait", "20", "--nats", nats],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert shift.returncode == 0, shift.stderr.decode()
        versions = set()
        for _ in range(20):
            versions.add(body_of(await get(ingress, "frontend", "/"))["catalog"]["version"])
        assert versions == {"v2"}
        # ...and v2 still reaches the opaque TCP stock service under control-plane snapshots,
        # whose TCP listener is compiled from the `protocol: tcp` Service (subset "default").
        assert body_of(await get(v2["inbound"], "catalog", "/items"))["items"][0]["stock"] == 21
        dump = json.loads((await get(v2["admin"], "admin", "/config_dump")).split(b"\r\n\r\n", 1)[1])
        assert [(t["name"], t["subset"]) for t in dump["snapshot"]["tcp"]] == [("stock", "default")]

        ports = [p for inst in topo["instances"].values() for p in (inst["app"], inst["inbound"]) if p]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert [p for p in ports if await port_open(p)] == []
    finally:
        if proc.returncode is None:  # a failed test: stop it the way a user would first
            await terminate(proc, grace=15)
