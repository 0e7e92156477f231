"""Fixtures for the identity-over-the-bus tests (helpers: identity_bus_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from identity_bus_helpers import Mesh, running_mesh

from bus.server import NatsServer


@pytest.fixture
async def mesh(nats_server: NatsServer) -> AsyncIterator[Mesh]:
    async with running_mesh(nats_server.url) as m:
        yield m
