"""The upstream pool with circuit breakers, on real loopback sockets inside one trio run."""

from __future__ import annotations

import random
import socket
import time
from functools import partial

import pytest
import trio

from mesh.snapshot import CircuitBreaker, Cluster, Endpoint
from sidecar.cluster import ClusterState
from sidecar.pool import ConnectFailed, Overflow, Pool


async def _server(nursery: trio.Nursery, closing: bool = False) -> int:
    """A TCP server that holds connections open (or closes them at once if `closing`)."""

    async def handler(stream: trio.SocketStream) -> None:
        if closing:
            await stream.aclose()
            return
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _cluster(port: int, **limits: int) -> ClusterState:
    config = Cluster(name="c", subsets=(("v1", (Endpoint("127.0.0.1", port),)),),
                     circuit_breaker=CircuitBreaker(**limits), connect_timeout=1.0)
    return ClusterState(config, random.Random(0), time.monotonic)


async def test_max_connections_and_pending() -> None:
    async with trio.open_nursery() as nursery:
        port = await _server(nursery)
        cluster = _cluster(port, max_connections=1, max_pending=0)
        ep = cluster.subsets["v1"][0]
        pool = Pool()
        conn, reused = await pool.acquire(ep, cluster)
        assert not reused and cluster.breaker.open_connections == 1
        with pytest.raises(Overflow):
            await pool.acquire(ep, cluster)

        cluster = _cluster(port, max_connections=1, max_pending=1)
        ep = cluster.subsets["v1"][0]
        first, _ = await pool.acquire(ep, cluster)
        got = []

        async def waiter() -> None:
            got.append(await pool.acquire(ep, cluster))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert cluster.breaker.pending == 1 and not got
        with pytest.raises(Overflow):  # the one pending slot is taken
            await pool.acquire(ep, cluster)
        pool.release(first, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert got and got[0] == (first, True)
        first.close()
        conn.close()
        nursery.cancel_scope.cancel()


async def test_max_requests_per_connection_and_stale_connections() -> None:
    async with trio.open_nursery() as nursery:
        port = await _server(nursery)
        cluster = _cluster(port, max_requests_per_connection=2)
        ep = cluster.subsets["v1"][0]
        pool = Pool()
        conn, _ = await pool.acquire(ep, cluster)
        conn.requests = 2
        pool.release(conn, 2)  # used up: closed, not pooled
        assert cluster.breaker.open_connections == 0
        assert (await pool.acquire(ep, cluster))[1] is False

        closing_port = await _server(nursery, closing=True)
        cluster = _cluster(closing_port)
        ep = cluster.subsets["v1"][0]
        conn, _ = await pool.acquire(ep, cluster)
        pool.release(conn, 0)
        await trio.sleep(0.05)  # the server closes it meanwhile
        conn.idle_since -= 2  # idle long enough to be checked before reuse
        again, reused = await pool.acquire(ep, cluster)
        assert not reused and again is not conn
        again.close()
        pool.close_all()
        nursery.cancel_scope.cancel()


async def test_connect_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = _cluster(port)
    with pytest.raises(ConnectFailed, match=f"127.0.0.1:{port}"):
        await Pool().acquire(cluster.subsets["v1"][0], cluster)
    assert cluster.breaker.open_connections == 0
