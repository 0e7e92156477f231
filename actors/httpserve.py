"""A tiny HTTP/1.1 server for actor endpoints (/metrics, the dashboard), one request per
connection, with an optional hand-over of WebSocket upgrades to trio-websocket.

Bind policy: the configured port if free, else an ephemeral one (logged), so
several control-plane replicas on one host do not crash each other.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("mesh.actors.http")

MAX_HEAD = 16384


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


class ReplayStream(trio.abc.Stream):
    """A stream that first returns bytes already read, then reads from the wrapped one."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            n = len(self.prefix) if max_bytes is None else max_bytes
            data, self.prefix = self.prefix[:n], self.prefix[n:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


Handler = Callable[[Request], Awaitable[Response]]
Upgrade = Callable[[ReplayStream, Request], Awaitable[None]]

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 500: b"Server Error"}


def _parse_head(head: bytes) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError(f"bad request line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers)


async def _handle(stream: trio.SocketStream, handler: Handler, upgrade: Upgrade | None) -> None:
    buf = b""
    try:
        with trio.move_on_after(10) as scope:
            while b"\r\n\r\n" not in buf:
                data = await stream.receive_some(4096)
                if not data or len(buf) > MAX_HEAD:
                    return
                buf += data
        if scope.cancelled_caught:
            return
        head, rest = buf.split(b"\r\n\r\n", 1)
        try:
            req = _parse_head(head)
        except ValueError:
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            return
        if upgrade is not None and req.headers.get("upgrade", "").lower() == "websocket":
            await upgrade(ReplayStream(stream, buf), req)
            return
        resp = await handler(req)
        await stream.send_all(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"cache-control: no-store\r\nconnection: close\r\n\r\n"
            % (
                resp.status,
                _REASONS.get(resp.status, b"Error"),
                resp.content_type.encode(),
                len(resp.body),
            )
            + (b"" if req.method == "HEAD" else resp.body)
        )
        del rest
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def bind(host: str, port: int) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        if port == 0:
            raise
        # Expected with several replicas on one host; `mesh up`'s banner names the port used.
        log.info("port %d on %s is busy (%s): using an ephemeral port", port, host, exc)
        return await trio.open_tcp_listeners(0, host=host)


async def serve(
    listeners: list[trio.SocketListener], handler: Handler, upgrade: Upgrade | None = None
) -> None:
    async def one(stream: trio.SocketStream) -> None:
        await _handle(stream, handler, upgrade)

    await trio.serve_listeners(one, listeners)


def bound_port(listeners: list[trio.SocketListener]) -> int:
    port: int = listeners[0].socket.getsockname()[1]
    return port
