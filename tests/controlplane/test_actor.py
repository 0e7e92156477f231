"""The config actor in-process against a real nats-server: debounced bursts, one delta per
change, and ACK bookkeeping, driven by a protocol client built from mesh.sync."""

from __future__ import annotations

from functools import partial

import trio
from test_e2e import BASE

from actors.config import ConfigActor
from actors.controlplane import run_replica
from bus import subjects
from bus.client import connect
from bus.server import NatsServer
from mesh.cli.apply_cmd import fetch_status
from mesh.compile import compile_service
from mesh.messages import SnapshotPush
from mesh.resources import ResourceSet, parse_text
from mesh.resources_store import Store
from mesh.sync import Apply, ClientSync


def base_with(weight: int) -> ResourceSet:
    text = BASE.replace("split: {v1: 100}", f"split: {{v1: {weight}, v2: {100 - weight}}}")
    return {r.key: r for r in parse_text(text, "base.yaml")}


async def test_a_burst_is_debounced_into_few_deltas(nats_server: NatsServer) -> None:
    actor = ConfigActor(warmup=0.2, debounce=0.1, max_delay=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_replica, [nats_server.url], "cp-t", actors=[actor]))
        async with connect(nats_server.url) as bus:
            store = await Store.open(bus)
            rev = await store.write(base_with(100), 0, "start")
            client = ClientSync(instance="pp-1", service="productpage", label="v1")
            pushes: list[SnapshotPush] = []
            async with bus.subscribe(subjects.config_push("productpage")) as sub:
                full, ack = (f("productpage", "pp-1") for f in (subjects.config_full, subjects.config_ack))
                first = await bus.request(full, client.hello(), SnapshotPush, timeout=5)
                action = client.on_push(first)
                assert isinstance(action, Apply)
                await bus.publish(ack, client.applied(None))
                # ten revisions in a burst, well inside one debounce window each
                for w in range(10, 100, 10):
                    rev = await store.write(base_with(w), rev, f"w={w}")
                with trio.move_on_after(2):
                    async for d in sub:
                        assert isinstance(d.body, SnapshotPush)
                        pushes.append(d.body)
                        action = client.on_push(d.body)
                        assert isinstance(action, Apply), action  # every delta is on its base
                        await bus.publish(ack, client.applied(None))
            assert 1 <= len(pushes) <= 3, [p.version for p in pushes]
            expected = compile_service(base_with(90), [], "productpage")
            assert client.version == expected.version
            assert client.snapshot == expected.snapshot
            st = await fetch_status(bus)
            assert st.revision == rev
            (row,) = st.sidecars
            assert (row["instance"], row["status"], row["acked"]) == (
                "pp-1",
                "SYNCED",
                expected.version,
            )
            assert st.stats["pushes"] == len(pushes) and st.stats["leading"]
        nursery.cancel_scope.cancel()


async def test_a_refused_stored_set_pushes_nothing(nats_server: NatsServer) -> None:
    """A stored set the control plane cannot read (written bypassing `mesh apply`) must not
    be replaced by an empty one: sidecars keep their last good routes and policies."""
    from bus.errors import BusTimeout

    actor = ConfigActor(warmup=0.2, debounce=0.05, max_delay=0.2)
    async with trio.open_nursery() as nursery:
        async with connect(nats_server.url) as bus:
            store = await Store.open(bus)
            await store.kv.put(subjects.CONFIG_KEY, b'{"resources": 5}')
            await nursery.start(partial(run_replica, [nats_server.url], "cp-t", actors=[actor]))
            client = ClientSync(instance="pp-1", service="productpage", label="v1")
            full = subjects.config_full("productpage", "pp-1")
            async with bus.subscribe(subjects.config_push("productpage")) as sub:
                # Past warmup and debounce: a compile would have run by the window's end.
                with trio.move_on_after(1.5):
                    try:
                        got = await bus.request(full, client.hello(), SnapshotPush, timeout=1)
                    except BusTimeout:
                        got = None
                    assert got is None, f"sent an empty snapshot: {got}"
                    async for d in sub:
                        raise AssertionError(f"pushed {d.body!r}")
        nursery.cancel_scope.cancel()
