"""A 3-node JetStream cluster survives losing one node."""

from __future__ import annotations

import pytest
import trio

from bus.client import connect
from bus.errors import KVError
from bus.kv import open_kv
from bus.server import NatsCluster
from mesh.messages import Blob

pytestmark = pytest.mark.slow


async def test_cluster_survives_one_node_killed(nats_cluster: NatsCluster) -> None:
    urls = nats_cluster.urls
    async with connect(urls) as pub:
        victim = next(n for n in nats_cluster.nodes if n.url == pub.connected_url)
        survivors = [u for u in urls if u != victim.url]
        kv = await open_kv(pub, "t_replicated", replicas=3)
        await kv.put("config", b"v1")
        async with (
            connect(survivors) as sub_bus,
            sub_bus.subscribe("t.cluster", capacity=10_000) as sub,
        ):
            victim.kill()
            with trio.fail_after(10):
                await victim.exited.wait()
            # Keep publishing through the loss: the bus reconnects to a survivor.
            for i in range(200):
                await pub.publish("t.cluster", Blob(label=str(i), data=b""))
                if i % 20 == 0:
                    await trio.sleep(0.01)
            with trio.fail_after(20):
                while not pub.is_connected or pub.connected_url == victim.url:
                    await trio.sleep(0.02)
                await pub.flush()
            got: set[str] = set()
            with trio.fail_after(10):
                async for d in sub:
                    got.add(d.body.label)  # type: ignore[attr-defined]
                    if "199" in got:
                        break
            assert "199" in got
            assert pub.stats.reconnects >= 1
        # KV with 3 replicas keeps its data and stays writable with 2 of 3 nodes.
        with trio.fail_after(20):
            while True:
                try:
                    entry = await kv.get("config")
                    break
                except Exception:
                    await trio.sleep(0.2)
        assert entry is not None and entry.value == b"v1"
        # A write needs the stream's leader: if the victim led it, the survivors elect a
        # new one first (seconds on a loaded machine), and a put meanwhile gets no response.
        with trio.fail_after(20):
            while True:
                try:
                    await kv.put("config", b"v2")
                    break
                except KVError:
                    await trio.sleep(0.2)
        entry = await kv.get("config")
        assert entry is not None and entry.value == b"v2"
