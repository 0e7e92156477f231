"""Opaque TCP telemetry through real processes: an echo app, a `mesh sidecar` whose TCP
listener reaches it, a `mesh controlplane` aggregating, and `mesh top --once --json`.

A long-lived connection is checked first, while it is still open: its bytes must show in
/metrics and in the aggregator before it closes (batches read the live counters)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
import yaml
from telemetry_helpers import mesh, process, read_json_line, sample

from bus.server import NatsServer

MESH = [sys.executable, "-m", "mesh"]
ECHO = Path(__file__).parent.parent / "sidecar" / "tcp_echo_app.py"
CHUNK = b"x" * 10_000


async def metrics(admin: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", admin)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    return raw.partition(b"\r\n\r\n")[2].decode()


async def echo_round(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(data)
    got = 0
    while got < len(data):
        chunk = await stream.receive_some(65536)
        assert chunk, "closed early"
        got += len(chunk)


async def top_edge(url: str, src: str, dst: str) -> dict[str, Any] | None:
    out = await mesh("top", "--nats", url, "--once", "--json", "--window", "1m")
    if out.returncode != 0:  # no aggregator answer yet
        return None
    for e in json.loads(out.stdout)["edges"]:
        if (e["src"], e["dst"]) == (src, dst):
            edge: dict[str, Any] = e
            return edge
    return None


async def test_tcp_traffic_shows_in_metrics_aggregator_and_top(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    async with (
        process(
            [*MESH, "controlplane", "--nats", url, "--replica", "cp-1", "--ready-line"],
            env={"MESH_METRICS_PORT": "0", "MESH_DASHBOARD_PORT": "0", "MESH_CA_SECRET": "s" * 32},
        ) as cp,
        process([sys.executable, str(ECHO)]) as echo,
    ):
        await read_json_line(cp, "event")
        echo_port = (await read_json_line(echo, "port"))["port"]
        snap = tmp_path / "snap.yaml"
        snap.write_text(yaml.safe_dump({
            "version": "1",
            "clusters": [{"name": "stock", "subsets": {"v1": [f"127.0.0.1:{echo_port}"]}}],
            "tcp": [{"name": "stock", "port": 0, "cluster": "stock", "subset": "v1"}],
        }))  # fmt: skip
        async with process([
            *MESH, "sidecar", "--service", "catalog", "--app-port", "9", "--config", str(snap),
            "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0",
            "--telemetry-nats", url, "--telemetry-interval", "0.2",
        ]) as side:  # fmt: skip
            ready = await read_json_line(side, "admin")
            admin, tcp_port = ready["admin"], ready["tcp"]["stock"]
            pair = {"reporter": "source", "source_service": "catalog",
                    "destination_service": "stock", "destination_version": "v1"}  # fmt: skip

            # One long-lived connection: 10 rounds of 10 kB each way, still open.
            long_lived = await trio.open_tcp_stream("127.0.0.1", tcp_port)
            async with long_lived:
                for _ in range(10):
                    await echo_round(long_lived, CHUNK)
                text = await metrics(admin)
                assert sample(text, "mesh_tcp_connections_opened_total", **pair) == 1
                assert sample(text, "mesh_tcp_connections_closed_total", **pair) == 0
                assert sample(text, "mesh_tcp_sent_bytes_total", **pair) == 100_000
                assert sample(text, "mesh_tcp_received_bytes_total", **pair) == 100_000
                with trio.fail_after(20):
                    while (edge := await top_edge(url, "catalog", "stock")) is None:
                        await trio.sleep(0.2)
                assert edge["protocol"] == "tcp" and edge["requests"] == 0
                assert edge["tcp_connections"] == 1
                assert edge["tcp_sent_bps"] > 0 and edge["tcp_received_bps"] > 0

            # Five short connections; all six closed.
            for _ in range(5):
                stream = await trio.open_tcp_stream("127.0.0.1", tcp_port)
                async with stream:
                    await echo_round(stream, CHUNK)
            with trio.fail_after(10):
                while sample(await metrics(admin), "mesh_tcp_connections_closed_total",
                             **pair) != 6:
                    await trio.sleep(0.05)
            text = await metrics(admin)
            assert sample(text, "mesh_tcp_connections_opened_total", **pair) == 6
            assert sample(text, "mesh_tcp_sent_bytes_total", **pair) == 150_000
            with trio.fail_after(20):
                while (edge := await top_edge(url, "catalog", "stock")) is None or edge[
                    "tcp_connections"
                ] < 6:
                    await trio.sleep(0.2)
            assert edge["tcp_connections"] == 6
            # The table shows TCP edges in their own section.
            table = (await mesh("top", "--nats", url, "--once", "--window", "1m")).stdout.decode()
            assert "CONN/S" in table and "catalog" in table and "stock" in table
