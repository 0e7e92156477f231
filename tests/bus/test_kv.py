"""JetStream key-value through the trio bus, against a real nats-server."""

from __future__ import annotations

import pytest
import trio

from bus.client import connect
from bus.errors import KVConflict
from bus.kv import INITIAL_DONE, KVEntry, open_kv
from bus.server import NatsServer


async def test_create_update_compare_and_swap(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as bus:
        kv = await open_kv(bus, "t_cas", history=5)
        assert await kv.get("leader") is None
        rev1 = await kv.create("leader", b"replica-a")
        with pytest.raises(KVConflict, match="already exists"):
            await kv.create("leader", b"replica-b")
        rev2 = await kv.update("leader", b"replica-a2", rev1)
        assert rev2 > rev1
        # A writer holding the old revision loses: the conflict is detected.
        with pytest.raises(KVConflict, match=f"no longer at revision {rev1}"):
            await kv.update("leader", b"replica-b", rev1)
        entry = await kv.get("leader")
        assert entry is not None and entry.value == b"replica-a2" and entry.revision == rev2
        await kv.delete("leader")
        assert await kv.get("leader") is None
        # create-if-absent works again after a delete
        await kv.create("leader", b"replica-c")
        assert [e.value for e in await kv.history("leader") if not e.deleted] == [
            b"replica-a",
            b"replica-a2",
            b"replica-c",
        ]


async def test_watch_sees_initial_values_marker_then_updates(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as bus:
        kv = await open_kv(bus, "t_watch")
        await kv.put("a", b"1")
        await kv.put("b", b"2")
        seen: list[KVEntry | str] = []
        async with kv.watch() as watch:
            with trio.fail_after(5):
                async for item in watch:
                    seen.append("DONE" if item is INITIAL_DONE else item)
                    if item is INITIAL_DONE:
                        await kv.put("a", b"3")
                        await kv.delete("b")
                    if len(seen) == 5:
                        break
        assert [(e.key, e.value) for e in seen[:2] if isinstance(e, KVEntry)] == [
            ("a", b"1"),
            ("b", b"2"),
        ]
        assert seen[2] == "DONE"
        upd, dele = seen[3], seen[4]
        assert isinstance(upd, KVEntry) and (upd.key, upd.value, upd.deleted) == ("a", b"3", False)
        assert isinstance(dele, KVEntry) and (dele.key, dele.deleted) == ("b", True)


async def test_watch_of_empty_bucket_gives_marker_at_once(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as bus:
        kv = await open_kv(bus, "t_empty")
        async with kv.watch() as watch:
            with trio.fail_after(5):
                assert await watch.__anext__() is INITIAL_DONE
