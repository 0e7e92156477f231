"""The demo application: small services that know nothing about the mesh.

Each one is plain HTTP (or a plain TCP line protocol) on localhost, written with
the standard library only, the way a team's existing service would be. Calls to
other services go to the local sidecar's outbound port with the destination in
the Host header; the mesh does the rest. The only mesh-related duty an app has is
the one Istio also asks of apps: copy the tracing headers from the request it
serves onto the requests it makes.

    python -m deploy.demo.app --role frontend --port 8080
    env: MESH_OUTBOUND=127.0.0.1:15001  (where the local sidecar's outbound listener is)
         STOCK_ADDR=127.0.0.1:16379     (the sidecar's TCP listener for the stock service)
         VERSION=v1

Roles: frontend -> catalog -> ratings (v2 only), catalog -> stock (TCP, v2 only).

A service whose dependency failed answers 500, not 502/503: the demo's routes
retry 502 and 503 on every hop, so a retriable status here would be retried
again by each caller's sidecar (retries multiplying up the call chain) and a
fault on ratings could never be seen by the client, with or without retries on
the ratings route (README, "Retries hide a fault").
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Headers an app forwards so the mesh can stitch a request's path together.
PROPAGATE = ("x-request-id", "traceparent", "tracestate", "x-user")

_local = threading.local()


def _outbound() -> tuple[str, int]:
    host, _, port = os.environ.get("MESH_OUTBOUND", "127.0.0.1:15001").rpartition(":")
    return host, int(port)


def call(service: str, path: str, incoming: Any) -> tuple[int, Any]:
    """GET http://<service><path> through the local sidecar, on a kept-alive connection."""
    conns: dict[str, http.client.HTTPConnection] = _local.__dict__.setdefault("conns", {})
    headers = {"Host": service}
    for name in PROPAGATE:
        value = incoming.get(name)
        if value:
            headers[name] = value
    for attempt in (1, 2):
        conn = conns.get(service)
        if conn is None:
            host, port = _outbound()
            conn = conns[service] = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conns.pop(service, None)
            if attempt == 2:
                return 502, {"error": f"cannot reach the sidecar for {service}"}
            continue
        try:
            return resp.status, json.loads(body or b"null")
        except ValueError:
            return resp.status, {"error": body[:200].decode(errors="replace")}
    raise AssertionError("unreachable")


def stock_level(sku: str) -> int | None:
    host, _, port = os.environ.get("STOCK_ADDR", "").rpartition(":")
    if not port:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"{sku}\n".encode())
            reply = s.makefile("rb").readline().decode().split()
        return int(reply[1])
    except (OSError, ValueError, IndexError):
        return None


ITEMS = [{"sku": "tea", "name": "Green tea"}, {"sku": "mug", "name": "Blue mug"}]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    role = "frontend"
    version = "v1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.reply(200, {"ok": True})
            return
        handler = getattr(self, f"serve_{self.role}")
        status, obj = handler()
        self.reply(status, {"service": self.role, "version": self.version, **obj})

    def serve_frontend(self) -> tuple[int, dict[str, Any]]:
        status, catalog = call("catalog", "/items", self.headers)
        return (200 if status < 500 else 500), {"catalog_status": status, "catalog": catalog}

    def serve_catalog(self) -> tuple[int, dict[str, Any]]:
        items: list[dict[str, Any]] = [dict(i) for i in ITEMS]
        if self.version != "v1":  # v2 shows ratings and stock
            status, ratings = call("ratings", "/ratings", self.headers)
            if status >= 500:
                return 500, {"error": "ratings unavailable", "ratings_status": status}
            for item in items:
                item["stars"] = ratings.get("ratings", {}).get(item["sku"])
                item["stock"] = stock_level(item["sku"])
        return 200, {"items": items}

    def serve_ratings(self) -> tuple[int, dict[str, Any]]:
        return 200, {"ratings": {"tea": 5, "mug": 4}}


class StockHandler(socketserver.StreamRequestHandler):
    """The opaque TCP service: one SKU per line in, `SKU COUNT` per line out."""

    def handle(self) -> None:
        for raw in self.rfile:
            sku = raw.decode(errors="replace").strip()
            self.wfile.write(f"{sku} {len(sku) * 7}\n".encode())


def main() -> None:
    ap = argparse.ArgumentParser(description="trio-mesh demo app (no mesh code inside)")
    ap.add_argument("--role", choices=["frontend", "catalog", "ratings", "stock"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", default=os.environ.get("VERSION", "v1"))
    args = ap.parse_args()
    server: socketserver.BaseServer
    if args.role == "stock":
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.daemon_threads = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", args.port), StockHandler)
    else:
        Handler.role = args.role
        Handler.version = args.version
        ThreadingHTTPServer.daemon_threads = True
        server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(json.dumps({"event": "ready", "role": args.role, "port": args.port}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
