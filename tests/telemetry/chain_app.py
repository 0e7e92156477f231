"""An uninstrumented app for the chain test, standard library only.

    chain_app.py --name backend [--next db --outbound-file PATH]

GET /chain...: with --next, calls the next service through this instance's sidecar
(outbound port read from --outbound-file, written once the sidecar is up) and answers
with its status; the last app answers 503 when the path contains "fail", else 200.
Like any app in a mesh with tracing, it copies traceparent/tracestate/x-request-id
from the incoming request to the outgoing one (the only thing an app must do).
Prints {"port": N} when listening.
"""

from __future__ import annotations

import argparse
import http.client
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FORWARD = ("traceparent", "tracestate", "x-request-id")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    name = ""
    next_service = ""
    outbound_file: Path | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.next_service and self.outbound_file is not None:
            port = int(self.outbound_file.read_text())
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            headers = {"Host": self.next_service}
            headers.update({h: self.headers[h] for h in FORWARD if self.headers.get(h)})
            conn.request("GET", self.path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
            conn.close()
        else:
            status = 503 if "fail" in self.path else 200
        body = json.dumps({"name": self.name, "status": status}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--next", default="")
    p.add_argument("--outbound-file", type=Path)
    args = p.parse_args()
    Handler.name = args.name
    Handler.next_service = args.next
    Handler.outbound_file = args.outbound_file
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
