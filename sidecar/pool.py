"""Upstream connections: a LIFO pool per endpoint, with the circuit-breaker limits.

Pooled connections go stale when the upstream closes idle ones, so the idle timeout
here (20 s) is kept below common upstream keep-alive timeouts, and the proxy retries
once on a fresh connection when a reused one fails before any response byte.

TLS seam: give `ssl_context` and every new connection is wrapped in trio.SSLStream
(the identity issue will provide the context; plaintext today).
"""

from __future__ import annotations

import select
import ssl
import time
from collections.abc import Awaitable, Callable

import trio

from mesh.snapshot import Cluster, Endpoint
from sidecar.cluster import BreakerState, ClusterState
from sidecar.fastio import close_now, io_for, set_nodelay, socket_stream, wait_recv_for
from sidecar.http.codec import ResponseReader


class ConnectFailed(Exception):
    pass


class Overflow(Exception):
    """A circuit breaker refused: too many connections and too many waiting."""


class UpstreamConn:
    __slots__ = ("breaker", "endpoint", "idle_list", "idle_since", "io", "reader", "requests",
                 "stream", "wait_recv")

    def __init__(self, stream: trio.abc.Stream, endpoint: Endpoint,
                 breaker: BreakerState) -> None:
        self.stream = stream
        # Plain sockets take the fast path; a TLS stream is used through its own API.
        self.io = io_for(stream)
        # The first read after sending a request: waiting first saves a failed syscall.
        self.wait_recv = wait_recv_for(self.io)
        self.endpoint = endpoint
        self.breaker = breaker
        self.reader = ResponseReader()
        self.requests = 0
        self.idle_since = 0.0
        # The pool's idle list for this endpoint, looked up once per connection rather
        # than per release: Endpoint's hash is computed in Python on every dict lookup.
        self.idle_list: list[UpstreamConn] = []

    def close(self) -> None:
        close_now(self.stream)
        self.breaker.open_connections -= 1
        if self.breaker.pending:
            self.breaker.released.unpark()


def _still_open(conn: UpstreamConn) -> bool:
    """An idle keep-alive connection has nothing to read; if it has, it is the upstream's
    close (or junk). One poll syscall, done only for connections idle over a second, which
    are the ones upstreams close."""
    sock = socket_stream(conn.stream)
    if sock is None:
        return True
    # poll(), not select(): select() raises ValueError for fds >= 1024, which a busy
    # sidecar reaches.
    poller = select.poll()
    poller.register(sock.socket.fileno(), select.POLLIN)
    try:
        return not poller.poll(0)  # readable when idle means EOF or junk: not reusable
    except OSError:
        return False


class Pool:
    def __init__(self, idle_timeout: float = 20.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.ssl_context = ssl_context
        # mTLS hook (sidecar/mtls.py, UpstreamTls.connect): wraps each new connection and
        # checks the server's identity; raises ConnectFailed (TlsRefused) when refused.
        self.tls: Callable[[trio.SocketStream, Cluster, Endpoint],
                           Awaitable[trio.abc.Stream]] | None = None
        self._idle: dict[Endpoint, list[UpstreamConn]] = {}
        self.opened = 0

    def take_idle(self, ep: Endpoint, check: bool = False) -> UpstreamConn | None:
        """A usable pooled connection to `ep`, or None: `acquire` without the coroutine,
        for the common case (a coroutine's creation and run cost ~0.5 us a request).
        `check`: make sure it is still open however briefly it was idle (for a request
        that cannot be retried on a fresh connection, e.g. a streamed upload)."""
        idle = self._idle.get(ep)
        if idle:
            now = time.monotonic()  # the pool's own clock: cheaper than trio.current_time()
            while idle:
                conn = idle.pop()
                age = now - conn.idle_since
                if age < self.idle_timeout and ((age < 1.0 and not check) or _still_open(conn)):
                    return conn
                conn.close()
        return None

    async def acquire(self, ep: Endpoint, cluster: ClusterState,
                      fresh: bool = False) -> tuple[UpstreamConn, bool]:
        """Return (connection, reused)."""
        if not fresh:
            pooled = self.take_idle(ep)
            if pooled is not None:
                return pooled, True
        breaker = cluster.breaker
        limits = cluster.config.circuit_breaker
        while breaker.open_connections >= limits.max_connections:
            if self._evict_idle(breaker):
                continue
            if breaker.pending >= limits.max_pending:
                raise Overflow(f"{breaker.open_connections} connections open and "
                               f"{breaker.pending} requests pending")
            breaker.pending += 1
            try:
                await breaker.released.park()
            finally:
                breaker.pending -= 1
            idle = self._idle.get(ep)
            if idle and not fresh:
                conn = idle.pop()
                return conn, True
        breaker.open_connections += 1
        try:
            with trio.fail_after(cluster.config.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(ep.host, ep.port)
        except (OSError, trio.TooSlowError) as exc:
            breaker.open_connections -= 1
            if breaker.pending:
                breaker.released.unpark()
            raise ConnectFailed(f"connect to {ep} failed: "
                                f"{'timeout' if isinstance(exc, trio.TooSlowError) else exc}"
                                ) from None
        set_nodelay(stream)
        if self.tls is not None:
            assert isinstance(stream, trio.SocketStream)
            try:
                stream = await self.tls(stream, cluster.config, ep)
            except BaseException:
                close_now(stream)
                breaker.open_connections -= 1
                if breaker.pending:
                    breaker.released.unpark()
                raise
        elif self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_hostname=ep.host)
        self.opened += 1
        conn = UpstreamConn(stream, ep, breaker)
        conn.idle_list = self._idle.setdefault(ep, [])
        return conn, False

    def _evict_idle(self, breaker: BreakerState) -> bool:
        for conns in self._idle.values():
            for i, conn in enumerate(conns):
                if conn.breaker is breaker:
                    del conns[i]
                    conn.close()
                    return True
        return False

    def release(self, conn: UpstreamConn, max_requests_per_connection: int) -> None:
        if max_requests_per_connection and conn.requests >= max_requests_per_connection:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        conn.idle_list.append(conn)
        if conn.breaker.pending:  # only waiters need waking; most releases have none
            conn.breaker.released.unpark()

    def close_all(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
            conns.clear()  # emptied in place: connections in use keep their list
