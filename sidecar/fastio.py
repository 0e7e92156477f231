"""Socket reads and writes that skip trio's per-call checkpoint when the kernel is ready.

trio makes every successful socket call a checkpoint (a trip through the scheduler) and
wraps it in a context manager that translates errors; on the proxy path that is several
of the ~70 us a request costs. Here a read or write is first tried straight on the
non-blocking fd, and trio waits only when the kernel says EAGAIN.

The price: a call that succeeds at once is not a checkpoint. The proxy therefore makes
an explicit checkpoint wherever a loop could run without ever waiting (pipelined
requests, body streaming), so cancellation and fairness still hold.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from sidecar.fasttls import FastTLS


class ByteIO(Protocol):
    """What the proxy needs from a connection: FastSocket, or any trio Stream (TLS)."""

    async def receive_some(self, max_bytes: int | None = ...) -> bytes | bytearray: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


class FastSocket:
    __slots__ = ("_fileno", "sock", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket
        # The stdlib socket's own fileno (a C method) under trio's wrapper: trio's
        # Python-level fileno() costs two calls, six times a request.
        self._fileno: Callable[[], int] = getattr(self.sock, "_sock", self.sock).fileno

    @property
    def fd(self) -> int:
        # Asked each time, never cached: a closed socket says -1 (EBADF), while a cached
        # number could by then name another connection's socket.
        return self._fileno()

    async def receive_some(self, max_bytes: int | None = 65536) -> bytes:
        if max_bytes is None:
            max_bytes = 65536
        try:
            return os.read(self._fileno(), max_bytes)
        except BlockingIOError:
            pass
        while True:
            await trio.lowlevel.wait_readable(self._fileno())
            try:
                return os.read(self._fileno(), max_bytes)
            except BlockingIOError:
                continue

    async def receive_after_wait(self, max_bytes: int = 65536) -> bytes:
        """For reads that are rarely ready at once (the next request on a keep-alive
        connection, the response right after sending its request): skip the try that
        would fail with EAGAIN and its exception."""
        while True:
            await trio.lowlevel.wait_readable(self._fileno())
            try:
                return os.read(self._fileno(), max_bytes)
            except BlockingIOError:
                continue

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            sent = os.write(self._fileno(), data)
        except BlockingIOError:
            sent = 0
        total = len(data)
        if sent == total:
            return
        view = memoryview(data)
        while sent < total:
            await trio.lowlevel.wait_writable(self.fd)
            try:
                sent += os.write(self.fd, view[sent:])
            except BlockingIOError:
                continue


def io_for(stream: trio.abc.Stream) -> ByteIO:
    """The fast path for plain sockets; any other stream (TLS) through its own API."""
    return FastSocket(stream) if isinstance(stream, trio.SocketStream) else stream


def wait_recv_for(io: ByteIO) -> Callable[[int], Awaitable[bytes | bytearray]]:
    """The read to use where data is rarely ready at once."""
    if isinstance(io, FastSocket | FastTLS):
        return io.receive_after_wait
    return io.receive_some


def socket_stream(stream: trio.abc.Stream) -> trio.SocketStream | None:
    if isinstance(stream, trio.SSLStream | FastTLS):
        stream = stream.transport_stream
    return stream if isinstance(stream, trio.SocketStream) else None


def close_now(stream: trio.abc.Stream) -> None:
    """Close without a checkpoint, so it also works inside a cancelled scope. (A TLS
    stream is dropped without close_notify: fine for a proxy closing on error or EOF.)"""
    sock = socket_stream(stream)
    if sock is not None:
        sock.socket.close()


def set_nodelay(stream: trio.abc.Stream) -> None:
    sock = socket_stream(stream)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
