"""Admin listener: /healthz, /ready, /config_dump, /metrics (one request per connection)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest

from sidecar.http.codec import HEAD, ProtocolError, RequestHead, RequestReader
from sidecar.stats import Stats, StatsCollector

log = logging.getLogger("mesh.sidecar.admin")


class AdminServer:
    def __init__(self, stats: Stats, dump: Callable[[], dict[str, Any]],
                 ready: Callable[[], bool],
                 certs: Callable[[], dict[str, Any] | None] | None = None) -> None:
        self._dump = dump
        self._certs = certs
        self._ready = ready
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(stats))

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(10):
                reader = RequestReader()
                while not any(kind == HEAD for kind, _ in reader.events):
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    reader.feed(data)
                head = next(v for k, v in reader.events if k == HEAD)
                assert isinstance(head, RequestHead)
                status, ctype, body = self._answer(head.path)
                await stream.send_all(
                    b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
                    b"connection: close\r\n\r\n%s"
                    % (status, b"OK" if status == 200 else b"Error", ctype.encode(), len(body),
                       body))
        except ProtocolError:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:
            log.exception("admin: unexpected error")
        finally:
            stream.socket.close()

    def _answer(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/ready":
            ok = self._ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        if path == "/config_dump":
            return 200, "application/json", json.dumps(self._dump(), indent=1).encode()
        if path in ("/metrics", "/stats"):
            return 200, "text/plain; version=0.0.4", generate_latest(self.registry)
        if path == "/certs":
            # Like Envoy's admin /certs: the chain and the trust bundle, never the key.
            certs = self._certs() if self._certs is not None else None
            if certs is None:
                return 404, "text/plain", b"no identity: this sidecar runs without mTLS\n"
            return 200, "application/json", json.dumps(certs, indent=1).encode()
        return 404, "text/plain", (b"not found: try /healthz /ready /config_dump /metrics "
                                   b"/certs\n")
