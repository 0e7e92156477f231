"""nats-server start-up when a port picked for it is taken before it binds."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import bus.server
from bus.server import NatsServer, NodeSpec
from mesh.processes import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def test_a_port_taken_meanwhile_is_picked_again(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first pick is a port someone else holds for real: nats-server fails to bind it.
    picks = iter([taken_port])
    monkeypatch.setattr(bus.server, "free_port", lambda host="127.0.0.1": next(picks, None) or free_port(host))
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(NodeSpec("t", tmp_path)).run)
        assert server.spec.port != taken_port
        assert "address already in use" in server.log_path.read_text()
        nursery.cancel_scope.cancel()


async def test_a_fixed_port_that_is_taken_fails_clearly(tmp_path: Path, taken_port: int) -> None:
    with trio.fail_after(20), pytest.raises(bus.server.NatsServerError, match="address already in use"):
        await NatsServer(NodeSpec("t", tmp_path, port=taken_port)).run()
