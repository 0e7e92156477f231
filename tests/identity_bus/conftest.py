"""Fixtures for the identity-over-the-bus tests (helpers: identity_bus_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from identity_bus_helpers import Mesh, running_mesh
from mtls_procs import Procs

from bus.server import NatsServer


@pytest.fixture
async def mesh(nats_server: NatsServer) -> AsyncIterator[Mesh]:
    async with running_mesh(nats_server.url) as m:
        yield m


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Procs]:
    """Apps and sidecars started by a test; all stopped when it ends."""
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        await p.close()
