"""Traffic shadowing (a route's `mirror`): fire-and-forget copies of requests.

A copy is sent only for a request whose body is already in memory (none, or one kept for
retries); it runs as a task in the Mirror's own nursery, which the long-lived Sidecar
starts, never on the request path: the client's response never waits for it. Its response
is read and discarded; every error is counted, none is raised. Copies carry
`x-mesh-mirror: 1` and the Host with `-shadow` appended (as Envoy does), reuse the
upstream Pool, are bounded in number (over the bound: skipped) and each runs under a
cancel scope with the route's timeout. Mirror outcomes do not feed outlier detection:
a shadow must not eject the endpoints that serve real traffic.
"""

from __future__ import annotations

import logging
import random

import trio

from mesh.snapshot import Endpoint
from mesh.snapshot import Mirror as MirrorConfig
from sidecar.cluster import ClusterState
from sidecar.http.codec import (
    END,
    HEAD,
    ProtocolError,
    RequestHead,
    ResponseHead,
    request_head_bytes,
)
from sidecar.pool import ConnectFailed, Overflow, Pool, UpstreamConn
from sidecar.stats import Stats

log = logging.getLogger("mesh.sidecar")

MAX_IN_FLIGHT = 64
RECV = 65536
MIRROR_HEADER = (b"x-mesh-mirror", b"1")
_IO_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def shadow_host(host: bytes) -> bytes:
    """`reviews` -> `reviews-shadow`, `reviews:9080` -> `reviews-shadow:9080`."""
    name, sep, port = host.rpartition(b":")
    if sep and name and port.isdigit() and (b":" not in name or name.endswith(b"]")):
        return name + b"-shadow:" + port
    return host + b"-shadow"


class Mirror:
    def __init__(self, pool: Pool, stats: Stats, rng: random.Random,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.pool = pool
        self.stats = stats
        self._rng = rng
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Owns the nursery the copies run in; started once by the Sidecar."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def maybe_send(self, config: MirrorConfig, cluster: ClusterState | None,
                   head: RequestHead, extra: list[tuple[bytes, bytes]],
                   drop: frozenset[bytes], body: bytes | None, timeout: float) -> None:
        """Called on the request path: never blocks, never raises."""
        if config.percent < 100 and self._rng.random() * 100 >= config.percent:
            return
        stats = self.stats
        if body is None or head.upgrade:
            stats.mirror_skipped["body"] += 1  # streamed once to the primary: not kept
            return
        nursery = self._nursery
        if nursery is None or cluster is None:
            stats.mirror_skipped["unavailable"] += 1
            return
        if self.in_flight >= self.max_in_flight:
            stats.mirror_skipped["busy"] += 1
            return
        key = head.get(cluster.hash_header) if cluster.hash_header is not None else None
        ep = cluster.pick(config.subset, key) if config.subset in cluster.subsets else None
        if ep is None:
            stats.mirror_skipped["no_endpoint"] += 1
            return
        host = head.get(b"host") or b""
        data = request_head_bytes(
            head, [*extra, (b"host", shadow_host(host)), MIRROR_HEADER], False,
            drop | {b"host", b"x-mesh-mirror"}) + body
        self.in_flight += 1
        stats.mirrored += 1
        nursery.start_soon(self._send, cluster, ep, data, head.method == b"HEAD", timeout)

    async def _send(self, cluster: ClusterState, ep: Endpoint, data: bytes, head_only: bool,
                    timeout: float) -> None:
        ok = False
        try:
            with trio.move_on_after(timeout):
                ok = await self._exchange(cluster, ep, data, head_only)
        except Exception:
            # A bug must cost one mirror copy, never the sidecar.
            log.exception("mirror: unexpected error")
        finally:
            self.in_flight -= 1
            if not ok:
                self.stats.mirror_failed += 1

    async def _exchange(self, cluster: ClusterState, ep: Endpoint, data: bytes,
                        head_only: bool) -> bool:
        """Send the copy, read the response and discard it. True if one came back."""
        try:
            conn, reused = await self.pool.acquire(ep, cluster)
        except (ConnectFailed, Overflow):
            return False
        if not reused:
            self.stats.upstream_connections += 1
        reuse = False
        try:
            await conn.io.send_all(data)
            answered, reuse = await self._drain(conn, head_only)
            return answered
        except (ProtocolError, *_IO_ERRORS):
            return False
        finally:
            if reuse:
                conn.requests += 1
                self.pool.release(conn, cluster.config.circuit_breaker.max_requests_per_connection)
            else:
                conn.close()

    async def _drain(self, conn: UpstreamConn, head_only: bool) -> tuple[bool, bool]:
        """Read the whole response, discarding it: (answered, connection reusable)."""
        reader = conn.reader
        if head_only:
            reader.expect_head_response()
        events = reader.events
        got_head = keep = False
        while True:
            while events:
                kind, value = events.popleft()
                if kind == HEAD:
                    assert isinstance(value, ResponseHead)
                    if 100 <= value.status < 200:
                        if events and events[0][0] == END:
                            events.popleft()  # interim response: the real one follows
                        continue
                    got_head = True
                    keep = value.keep_alive and (value.content_length is not None
                                                 or value.chunked or head_only
                                                 or value.status in (204, 304))
                elif kind == END:
                    if head_only:
                        conn.reader = type(reader)()  # llhttp cannot reuse it after HEAD
                    return got_head, keep and not events
            data = await conn.io.receive_some(RECV)
            if not data:
                # A body delimited by the close has ended; before the head it is a failure.
                return got_head, False
            reader.feed(bytes(data))
