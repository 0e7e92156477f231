"""A concurrent opaque TCP echo server for tests: prints {"port": N}, then echoes each
connection's bytes until EOF (or a reset), one thread per connection."""

from __future__ import annotations

import json
import socket
import socketserver


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


def main() -> None:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
        print(json.dumps({"port": server.server_address[1]}), flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
