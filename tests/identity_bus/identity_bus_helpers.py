"""A real CA actor (in this process) on a real nats-server, plus identity agents.

A uniquely named module (not conftest) so that `from ... import` works whichever test
folders pytest collects together."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import trio

from actors.ca import CaActor
from actors.ca_config import CaConfig
from actors.runtime import ActorContext
from bus.client import Bus, connect
from mesh.cli.token_cmd import create_token
from mesh.spiffe import SpiffeId
from sidecar.identity import IdentityAgent

TD = "test.mesh"


def ident(sa: str) -> str:
    """The SPIFFE ID of service account `sa` in the tests' namespace."""
    return f"spiffe://{TD}/ns/shop/sa/{sa}"
SECRET = b"test operator secret, 32 bytes.."


@dataclass
class Mesh:
    bus: Bus
    ca: CaActor
    nursery: trio.Nursery

    async def token(self, ns: str, sa: str, *, uses: int = 1) -> str:
        text, _ = await create_token(self.bus, SpiffeId(TD, ns, sa), uses=uses)
        return text

    async def agent(self, ns: str, sa: str, **kwargs: object) -> IdentityAgent:
        """An agent with a fresh token, running, with its first certificate."""
        agent = IdentityAgent(SpiffeId(TD, ns, sa), token=await self.token(ns, sa), **kwargs)  # type: ignore[arg-type]
        await self.nursery.start(agent.run, self.bus)
        with trio.fail_after(10):
            await agent.wait_ready()
        return agent


@asynccontextmanager
async def running_mesh(
    url: str, *, leaf_ttl: timedelta = timedelta(hours=1)
) -> AsyncIterator[Mesh]:
    config = CaConfig(secret=SECRET, trust_domain=TD, leaf_ttl=leaf_ttl, lease_ttl=1.0)
    async with connect(url) as bus, trio.open_nursery() as nursery:
        ca = CaActor(config)
        await nursery.start(ca.run, ActorContext(bus=bus, replica="cp-test"))
        with trio.fail_after(10):
            await ca.leading.wait()
        yield Mesh(bus, ca, nursery)
        nursery.cancel_scope.cancel()
