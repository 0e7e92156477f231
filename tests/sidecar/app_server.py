"""A small real HTTP/1.1 app for sidecar tests, built on the standard library only
(so the oracle shares no code with the proxy under test).

Run: python app_server.py --name v1 [--fail] ; prints {"event": "ready", "port": N} when listening.

Paths:
  /anything          200 JSON: name, method, path, headers
  /status/<code>     that status, JSON body
  /delay/<seconds>   sleeps, then 200
  /count (POST/PUT)  reads the body (Content-Length or chunked), answers its length and
                     the chunked trailer fields it got ("trailers": {name: value})
  /reject (POST/PUT) answers 413 after the head, without reading the body, and closes
  /trailers          a chunked body followed by trailer fields x-checksum and x-count
  /bytes/<n>         n bytes of 'x' (query chunked=1: chunked encoding)
  /close/<n>         n bytes, no length, closes the connection to end the body
  /garbage           not HTTP
  /truncate          promises 1000 bytes, sends 10 and closes
  /close-after       a normal keep-alive response, then the connection is closed
  /echo-upgrade      101 Switching Protocols, then echoes bytes until EOF
  /204, /304         no body
  /_seen             200 JSON list of the requests received so far (path, method, headers,
                     body length), this one excluded
--fail makes every request answer 500.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN: list[dict[str, object]] = []  # every request but /_seen, for mirror tests


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else 40 ms stalls between head and body writes
    server_version = "testapp"
    name = "app"
    fail = False

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-app", self.name)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int = 200, **extra: object) -> None:
        body = json.dumps({"name": self.name, "method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()},
                           "header_names": [k.lower() for k in self.headers],
                           **extra}).encode()
        self._send(status, body)

    def _read_body(self) -> int:
        self.trailers: dict[str, str] = {}
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                        k, _, v = line.decode("latin-1").partition(":")
                        self.trailers[k.strip().lower()] = v.strip()
                    return total
                left = size
                while left:
                    got = self.rfile.read(min(left, 1 << 16))
                    if not got:
                        raise ConnectionError("short chunk")
                    left -= len(got)
                total += size
                self.rfile.readline()
        left = int(self.headers.get("content-length", "0"))
        total = 0
        while left:
            got = self.rfile.read(min(left, 1 << 16))
            if not got:
                raise ConnectionError("short body")
            left -= len(got)
            total += len(got)
        return total

    def do_GET(self) -> None:
        self._route()

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self) -> None:
        self._route()

    do_PUT = do_POST

    def _route(self) -> None:
        path = self.path.split("?")[0]
        if path == "/_seen":
            return self._send(200, json.dumps(SEEN).encode())
        seen: dict[str, object] = {"path": self.path, "method": self.command,
                                   "headers": {k.lower(): v for k, v in self.headers.items()}}
        SEEN.append(seen)
        if self.command in ("POST", "PUT") and path == "/reject":
            self.close_connection = True  # the unread body makes the close a reset
            return self._json(413)
        if path == "/trailers":
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("trailer", "x-checksum, x-count")
            self.end_headers()
            self.wfile.write(b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\nx-count: 5\r\n\r\n")
            return None
        if self.command in ("POST", "PUT"):
            n = self._read_body()
            seen["received"] = n
            if self.fail:
                return self._json(500)
            return self._json(200, received=n, trailers=self.trailers)
        if self.fail:
            return self._json(500)
        if path.startswith("/status/"):
            return self._json(int(path.split("/")[2]))
        if path.startswith("/delay/"):
            time.sleep(float(path.split("/")[2]))
            return self._json(200)
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            return self._stream(n, chunked="chunked=1" in self.path)
        if path.startswith("/close/"):
            n = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(b"z" * n)
            self.close_connection = True
            return None
        if path == "/close-after":
            # Keep-alive by its headers, then closes anyway: a pooled connection goes stale.
            self._json(200)
            self.close_connection = True
            return None
        if path == "/garbage":
            self.wfile.write(b"\x00\x01 this is not http\r\n\r\n")
            self.close_connection = True
            return None
        if path == "/truncate":
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            self.close_connection = True
            return None
        if path == "/echo-upgrade":
            self.send_response(101)
            self.send_header("connection", "upgrade")
            self.send_header("upgrade", self.headers.get("upgrade", "echo"))
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(65536)
                if not data:
                    break
                self.connection.sendall(data)
            self.close_connection = True
            return None
        if path == "/204":
            self.send_response(204)
            self.send_header("x-app", self.name)
            self.end_headers()
            return None
        if path == "/304":
            self.send_response(304)
            self.send_header("etag", '"abc"')
            self.end_headers()
            return None
        return self._json(200)

    def _stream(self, n: int, chunked: bool) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.send_header("content-length", str(n))
        self.end_headers()
        if self.command == "HEAD":
            return
        block = b"x" * 65536
        left = n
        while left:
            part = block[: min(left, len(block))]
            self.wfile.write(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
            left -= len(part)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--name", default="app")
    ap.add_argument("--fail", action="store_true")
    args = ap.parse_args()
    Handler.name = args.name
    Handler.fail = args.fail
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(json.dumps({"event": "ready", "port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
