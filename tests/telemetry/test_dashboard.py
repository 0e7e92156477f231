"""The dashboard: the service graph over HTTP and a live WebSocket, rendered by real
headless Chromium (Debian package `chromium`; skipped with a reason when it is missing)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio_websocket
from telemetry_helpers import http_get, simulate

from actors.dashboard import DashboardActor
from actors.runtime import ActorContext
from actors.telemetry import TelemetryActor
from bus.client import connect
from bus.server import NatsServer
from sidecar.telemetry import Recorder, TelemetryPublisher

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_colors(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct colours) of an 8-bit RGB/RGBA PNG: a tiny pure decoder."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, bpp = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colors: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif f == 4:
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        if y % 4 == 0:
            colors.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 2))
        prev = line
    return width, height, len(colors)


@asynccontextmanager
async def dashboard_with_traffic(
    url: str,
) -> AsyncIterator[tuple[DashboardActor, dict[str, Recorder]]]:
    recorders = {s: Recorder("default", s, f"{s}-1") for s in ("frontend", "backend")}
    agg = TelemetryActor(metrics_port=None)
    dash = DashboardActor(port=0, interval=0.2, window="1m")
    async with (
        connect(url, name="cp") as cp_bus,
        connect(url, name="sidecars") as bus,
        trio.open_nursery() as nursery,
    ):
        ctx = ActorContext(bus=cp_bus, replica="cp-1")
        await nursery.start(agg.run, ctx)
        await nursery.start(dash.run, ctx)
        for r in recorders.values():
            await nursery.start(TelemetryPublisher(r, bus, interval=0.1).run)
        simulate(recorders)
        with trio.fail_after(10):
            while len(json.loads(dash.latest)["edges"]) < 2:
                await trio.sleep(0.05)
        yield dash, recorders
        nursery.cancel_scope.cancel()


async def test_graph_json_and_live_websocket(nats_server: NatsServer) -> None:
    async with dashboard_with_traffic(nats_server.url) as (dash, recorders):
        status, body = await http_get(dash.port, "/graph.json")
        graph = json.loads(body)
        assert status == 200 and graph["nodes"] == ["backend", "db", "frontend"]
        edges = {(e["src"], e["dst"]): e for e in graph["edges"]}
        assert edges[("frontend", "backend")]["requests"] == 100
        assert edges[("frontend", "backend")]["error_rate"] == 0.1
        status, page = await http_get(dash.port, "/")
        assert status == 200 and b"new WebSocket" in page

        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{dash.port}/ws") as ws:
            first = json.loads(await ws.get_message())
            assert {e["src"] for e in first["edges"]} == {"frontend", "backend"}
            simulate(recorders)  # more traffic: the socket pushes the new counts
            with trio.fail_after(10):
                while True:
                    g = json.loads(await ws.get_message())
                    e = {(x["src"], x["dst"]): x for x in g["edges"]}
                    if e[("frontend", "backend")]["requests"] == 200:
                        break


@asynccontextmanager
async def chromium(args: list[str], out: Path) -> AsyncIterator[trio.Process]:
    assert CHROMIUM is not None
    argv = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={out / 'profile'}",
        *args,
    ]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    stdout, stderr = os.open(out / "chromium.out", flags), os.open(out / "chromium.err", flags)
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdout=stdout, stderr=stderr, start_new_session=True
        )
    finally:
        os.close(stdout)
        os.close(stderr)
    try:
        yield proc
    finally:
        # Chromium forks helpers (zygote, renderer): kill the whole session.
        with trio.CancelScope(shield=True):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` (apt-get install chromium)")
async def test_chromium_renders_the_graph_with_edge_labels(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with dashboard_with_traffic(nats_server.url) as (dash, recorders):
        # An opaque TCP edge too: one connection with bytes both ways, one refused.
        tcp = recorders["backend"].tcp
        conn = tcp.open("source", "backend", "cache", "v1")
        conn.sent.n += 4000
        conn.received.n += 90000
        tcp.deny("destination", "backend", "cache", "v1")
        with trio.fail_after(10):
            while not any(e["dst"] == "cache" for e in json.loads(dash.latest)["edges"]):
                await trio.sleep(0.05)
        url = f"http://127.0.0.1:{dash.port}/"
        async with (
            chromium(
                ["--virtual-time-budget=5000", "--dump-dom", url],
                tmp_path,
            ) as dom_proc,
        ):
            with trio.fail_after(40):
                await dom_proc.wait()
        dom = (tmp_path / "chromium.out").read_text()
        assert 'id="edge-frontend-backend"' in dom, dom[-2000:]
        assert 'id="edge-backend-db"' in dom
        assert "100.0% err" not in dom
        assert "10.0% err" in dom and "0.0% err" in dom and "rps" in dom
        assert 'id="node-db"' in dom
        assert 'id="edge-backend-cache"' in dom and "conn/s" in dom and "1 denied" in dom

        shot = tmp_path / "graph.png"
        if os.environ.get("MESH_KEEP_SCREENSHOT"):
            shot = Path(os.environ["MESH_KEEP_SCREENSHOT"])
        (tmp_path / "profile").mkdir(exist_ok=True)
        async with chromium(
            ["--virtual-time-budget=5000", "--window-size=1100,600", f"--screenshot={shot}", url],
            tmp_path,
        ) as shot_proc:
            with trio.fail_after(40):
                await shot_proc.wait()
        data = shot.read_bytes()
        width, height, colors = png_colors(data)
        assert (width, height) == (1100, 600)
        # Header, nodes, edges, labels, table: far more than a blank page's few colours.
        assert colors > 20, colors
