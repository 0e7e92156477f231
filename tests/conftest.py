"""Shared fixtures. Tests run real nats-server processes, real sockets and real TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from bus.server import NatsCluster, NatsServer, NodeSpec


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh single-node nats-server with JetStream, on free loopback ports."""
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(NodeSpec("t1", tmp_path / "nats")).run)
        yield server
        nursery.cancel_scope.cancel()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A fresh 3-node JetStream cluster on loopback."""
    async with trio.open_nursery() as nursery:
        cluster: NatsCluster = await nursery.start(NatsCluster(3, tmp_path / "cluster").run)
        yield cluster
        nursery.cancel_scope.cancel()
