"""The dashboard actor: a web page with the live service graph.

One HTTP port (env ``MESH_DASHBOARD_PORT``, default 8484; ``off`` disables;
a busy port falls back to an ephemeral one, logged) serves:

- ``/``           the page (inline HTML, SVG and JavaScript, no external assets);
- ``/graph.json`` the current graph (so the page draws before the socket opens);
- ``/ws``         a WebSocket (trio-websocket) pushing the graph every second.

The graph comes from `query_graph` (every aggregator replica answers on
``mesh.graph.scatter``; the one merging longest wins), polled once per second by
one task whatever the number of viewers.
"""

from __future__ import annotations

import json
import logging
import os

import trio
import trio_websocket

from actors.httpserve import ReplayStream, Request, Response, bind, bound_port, serve
from actors.runtime import ActorContext
from actors.telemetry import query_graph
from mesh.errors import MeshError

log = logging.getLogger("mesh.actors.dashboard")

DEFAULT_DASHBOARD_PORT = 8484


class DashboardActor:
    name = "dashboard"

    def __init__(
        self,
        *,
        port: int | None = DEFAULT_DASHBOARD_PORT,
        host: str = "127.0.0.1",
        interval: float = 1.0,
        window: str = "10s",
    ) -> None:
        self.port_wanted = port
        self.host = host
        self.interval = interval
        self.window = window
        self.port = 0
        self.latest = json.dumps({"nodes": [], "edges": [], "window": window, "replica": ""})
        self.version = 0
        self._changed = trio.Event()

    @classmethod
    def from_env(cls) -> DashboardActor:
        raw = os.environ.get("MESH_DASHBOARD_PORT", str(DEFAULT_DASHBOARD_PORT))
        return cls(
            port=None if raw in ("", "off") else int(raw),
            host=os.environ.get("MESH_HTTP_HOST", "127.0.0.1"),
        )

    async def run(
        self, ctx: ActorContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        if self.port_wanted is None:  # disabled
            task_status.started()
            await trio.sleep_forever()
        listeners = await bind(self.host, self.port_wanted)
        self.port = bound_port(listeners)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._poll, ctx)
            nursery.start_soon(serve, listeners, self._http, self._websocket)
            log.info("dashboard on http://%s:%d/", self.host, self.port)
            task_status.started()

    async def _poll(self, ctx: ActorContext) -> None:
        while True:
            try:
                reply = await query_graph(ctx.bus, self.window, timeout=2.0)
            except MeshError as exc:  # no aggregator yet, or a slow one: keep the last graph
                log.debug("dashboard: graph query failed: %s", exc)
            else:
                self.latest = json.dumps(
                    {
                        "nodes": reply.nodes,
                        "edges": reply.edges,
                        "window": reply.window,
                        "replica": reply.replica,
                        "ts": reply.ts,
                    }
                )
                self.version += 1
                self._changed.set()
                self._changed = trio.Event()
            await trio.sleep(self.interval)

    async def _http(self, req: Request) -> Response:
        if req.path in ("/", "/index.html"):
            return Response(200, "text/html; charset=utf-8", PAGE.encode())
        if req.path == "/graph.json":
            return Response(200, "application/json", self.latest.encode())
        if req.path == "/healthz":
            return Response(200, "text/plain", b"ok\n")
        return Response(404, "text/plain", b"not found: try /\n")

    async def _websocket(self, stream: ReplayStream, req: Request) -> None:
        if req.path != "/ws":
            return
        async with trio.open_nursery() as nursery:
            ws_request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await ws_request.accept()
            try:
                while True:
                    changed = self._changed
                    await ws.send_message(self.latest)
                    with trio.move_on_after(self.interval * 5):
                        await changed.wait()
            except trio_websocket.ConnectionClosed:
                pass
            finally:
                nursery.cancel_scope.cancel()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>trio-mesh: service graph</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { padding: 12px 20px; background: #1d2330; color: #fff; display: flex; gap: 24px; }
  header b { font-size: 18px; }
  #status { color: #9fe3b0; }
  #status.down { color: #ffb4a8; }
  main { display: flex; gap: 16px; padding: 16px; }
  svg { background: #fff; border: 1px solid #d5d9e0; border-radius: 8px; }
  .node circle { fill: #3b6fd8; stroke: #1d2330; stroke-width: 2; }
  .node text { font-size: 14px; font-weight: 600; text-anchor: middle; }
  .edge line { stroke: #6b7689; stroke-width: 2.5; }
  .edge.bad line { stroke: #d8453b; }
  .edge.tcp line { stroke-dasharray: 6 4; }
  .edge-label { font-size: 12px; fill: #1d2330; }
  .edge.bad .edge-label { fill: #b3261e; font-weight: 600; }
  table { border-collapse: collapse; background: #fff; font-size: 13px; align-self: flex-start; }
  th, td { border: 1px solid #d5d9e0; padding: 4px 8px; text-align: right; }
  th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
</style>
</head>
<body>
<header><b>trio-mesh</b><span>service graph, window <span id="window">10s</span></span>
<span id="status" class="down">connecting…</span><span id="updated"></span></header>
<main>
<svg id="graph" width="720" height="520" viewBox="0 0 720 520">
  <defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8"
    markerHeight="8" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z"
    fill="#6b7689"/></marker></defs>
  <g id="edges"></g><g id="nodes"></g>
  <text id="empty" x="360" y="260" text-anchor="middle" fill="#6b7689">no traffic yet</text>
</svg>
<table id="table"><thead><tr><th>source</th><th>destination</th><th>rps</th>
<th>errors</th><th>p50</th><th>p99</th></tr></thead><tbody></tbody></table>
</main>
<script>
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(1) + "ms"; }
function bytes(v) {
  return v >= 1e6 ? (v / 1e6).toFixed(1) + " MB/s" : v >= 1e3 ? (v / 1e3).toFixed(1) + " kB/s" : v.toFixed(0) + " B/s";
}
// Opaque TCP edges have no requests: connections opened per second and bytes per second
// both ways (sent: source to destination), plus refusals by policy when there were any.
function tcpLabel(e) {
  return "tcp " + e.tcp_cps.toFixed(1) + " conn/s · ↑" + bytes(e.tcp_sent_bps) + " ↓" +
    bytes(e.tcp_received_bps) + (e.tcp_denied ? " · " + e.tcp_denied + " denied" : "");
}
function label(e) {
  if (e.protocol === "tcp") return tcpLabel(e);
  return e.rps.toFixed(1) + " rps · " + (e.error_rate * 100).toFixed(1) + "% err · p99 " + ms(e.p99_ms);
}
function render(g) {
  document.getElementById("window").textContent = g.window;
  document.getElementById("updated").textContent = g.replica ? "from " + g.replica : "";
  const nodes = g.nodes, pos = {};
  const cx = 360, cy = 260, r = nodes.length > 1 ? 190 : 0;
  nodes.forEach((n, i) => {
    const a = -Math.PI / 2 + 2 * Math.PI * i / nodes.length;
    pos[n] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const edges = document.getElementById("edges"), nodesG = document.getElementById("nodes");
  edges.replaceChildren(); nodesG.replaceChildren();
  document.getElementById("empty").style.display = g.edges.length ? "none" : "";
  const rows = [];
  for (const e of g.edges) {
    const [x1, y1] = pos[e.src], [x2, y2] = pos[e.dst];
    const d = Math.hypot(x2 - x1, y2 - y1) || 1, ux = (x2 - x1) / d, uy = (y2 - y1) / d;
    const bad = e.error_rate > 0.05 || (e.protocol === "tcp" && e.tcp_denied > 0);
    const grp = el("g", {class: "edge" + (bad ? " bad" : "") + (e.protocol === "tcp" ? " tcp" : ""), id: "edge-" + e.src + "-" + e.dst});
    grp.appendChild(el("line", {x1: x1 + ux * 34, y1: y1 + uy * 34, x2: x2 - ux * 36, y2: y2 - uy * 36, "marker-end": "url(#arrow)"}));
    // Labels sit outside the edge, away from the centre, so converging edges do not collide.
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2, ox = mx - cx, oy = my - cy, od = Math.hypot(ox, oy) || 1;
    grp.appendChild(el("text", {class: "edge-label", x: mx + ox / od * 12, y: my + oy / od * 12 + 4,
      "text-anchor": ox < -1 ? "end" : ox > 1 ? "start" : "middle"}, label(e)));
    edges.appendChild(grp);
    if (e.protocol === "tcp") {
      rows.push("<tr class='tcp'><td>" + e.src + "</td><td>" + e.dst + "</td><td colspan='4'>" +
        tcpLabel(e) + "</td></tr>");
    } else {
      rows.push("<tr><td>" + e.src + "</td><td>" + e.dst + "</td><td>" + e.rps.toFixed(1) + "</td><td>" +
        (e.error_rate * 100).toFixed(1) + "%</td><td>" + ms(e.p50_ms) + "</td><td>" + ms(e.p99_ms) + "</td></tr>");
    }
  }
  for (const n of nodes) {
    const grp = el("g", {class: "node", id: "node-" + n});
    grp.appendChild(el("circle", {cx: pos[n][0], cy: pos[n][1], r: 30}));
    grp.appendChild(el("text", {x: pos[n][0], y: pos[n][1] + 50}, n));
    nodesG.appendChild(grp);
  }
  document.querySelector("#table tbody").innerHTML = rows.join("");
}
fetch("/graph.json").then(r => r.json()).then(render).catch(() => {});
function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  const status = document.getElementById("status");
  ws.onopen = () => { status.textContent = "live"; status.className = ""; };
  ws.onmessage = (m) => render(JSON.parse(m.data));
  ws.onclose = () => { status.textContent = "reconnecting…"; status.className = "down"; setTimeout(connect, 1000); };
}
connect();
</script>
</body>
</html>
"""
