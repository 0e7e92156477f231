"""Publish/subscribe, request/reply and bad input against a real nats-server."""

from __future__ import annotations

import msgpack
import pytest
import trio

from bus.client import Bus, connect
from bus.errors import BusClosed, BusConnectError, BusOutsideConnect, BusTimeout, NoResponders
from bus.server import NatsServer
from bus.subscription import Overflow
from mesh.messages import Blob, MessageTooLarge, Ping, Pong
from mesh.processes import free_port


async def test_pubsub_round_trip(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as a, connect(nats_server.url) as b:
        async with b.subscribe("t.round") as sub:
            for i in range(100):
                a.publish_nowait("t.round", Blob(label=str(i), data=b"x" * i))
            await a.flush()
            got = []
            with trio.fail_after(5):
                async for d in sub:
                    assert isinstance(d.body, Blob)
                    got.append(d.body.label)
                    if len(got) == 100:
                        break
    assert got == [str(i) for i in range(100)]


async def test_request_reply_and_timeouts(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as server_bus, connect(nats_server.url) as client:
        # Nobody subscribed: a clear NoResponders, not a hang.
        with pytest.raises(NoResponders, match=r"t\.echo"):
            await client.request("t.echo", Ping(sender="c"), Pong, timeout=2)

        async with trio.open_nursery() as nursery, server_bus.subscribe("t.echo") as sub:

            async def serve() -> None:
                async for d in sub:
                    assert isinstance(d.body, Ping)
                    server_bus.reply(d, Pong(replica=d.body.sender, version="1", uptime_s=0.0))

            nursery.start_soon(serve)
            pong = await client.request("t.echo", Ping(sender="me"), Pong, timeout=2)
            assert pong.replica == "me"
            nursery.cancel_scope.cancel()

        # Subscribed but never answering: the timeout is a cancel scope, bounded.
        async with server_bus.subscribe("t.silent"):
            start = trio.current_time()
            with pytest.raises(BusTimeout, match=r"no reply on t\.silent within 0\.3 s"):
                await client.request("t.silent", Ping(), Pong, timeout=0.3)
            assert trio.current_time() - start < 2


async def test_undecodable_and_oversized_are_dropped_and_reader_keeps_going(
    nats_server: NatsServer,
) -> None:
    big_limit = 4 * 1024 * 1024
    async with (
        connect(nats_server.url, max_message_bytes=64 * 1024) as reader,
        connect(nats_server.url, max_message_bytes=big_limit) as writer,
    ):
        async with reader.subscribe("t.bad") as sub:
            writer.publish_nowait("t.bad", b"\xc1 not msgpack")
            writer.publish_nowait("t.bad", msgpack.packb({"t": "nope", "v": 1, "b": {}}))
            writer.publish_nowait(
                "t.bad", msgpack.packb({"t": "pong", "v": 1, "b": {"replica": 7}})
            )
            writer.publish_nowait("t.bad", Blob(label="huge", data=b"x" * (1024 * 1024)))
            writer.publish_nowait("t.bad", Blob(label="ok", data=b"fine"))
            await writer.flush()
            with trio.fail_after(5):
                d = await sub.receive()
            assert isinstance(d.body, Blob) and d.body.label == "ok"
        assert reader.stats.drops["undecodable"] == 3
        assert reader.stats.drops["oversized"] == 1

        # The publisher refuses over its own limit before NATS sees it.
        with pytest.raises(MessageTooLarge, match="over the limit of 65536 bytes"):
            reader.publish_nowait("t.bad", Blob(label="x", data=b"x" * 70_000))


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [
        (Overflow.DROP_NEWEST, ["0", "1", "2", "3"]),
        (Overflow.DROP_OLDEST, ["16", "17", "18", "19"]),
    ],
)
async def test_bounded_subscription_policy(
    nats_server: NatsServer, overflow: Overflow, expected: list[str]
) -> None:
    async with connect(nats_server.url) as bus:
        async with bus.subscribe("t.slow", capacity=4, overflow=overflow) as sub:
            for i in range(20):
                bus.publish_nowait("t.slow", Blob(label=str(i), data=b""))
            await bus.flush()
            # Let every message arrive before reading any, so the channel overflows.
            with trio.fail_after(5):
                while sub.received + bus.stats.drops["overflow"] < 20:
                    await trio.sleep(0.01)
            got = []
            for _ in range(4):
                got.append((await sub.receive()).body.label)  # type: ignore[attr-defined]
        assert got == expected
        assert bus.stats.drops["overflow"] == 16


async def test_dead_url_fails_clearly_within_bounded_time() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    start = trio.current_time()
    with pytest.raises(BusConnectError) as info:
        async with connect(url, connect_timeout=1.0):
            pass
    elapsed = trio.current_time() - start
    assert url in str(info.value)
    assert "within 1 s" in str(info.value)
    assert elapsed < 8  # connect_timeout 1 s, plus generous slack for a loaded machine


async def test_bad_url_is_refused() -> None:
    with pytest.raises(BusConnectError, match="not a NATS URL"):
        async with connect("http://127.0.0.1:4222"):
            pass


async def test_custom_decoder_bad_input_is_dropped_but_a_bug_fails_the_bus(
    nats_server: NatsServer,
) -> None:
    from mesh.messages import UndecodableMessage

    def decode(data: bytes) -> int:
        if data == b"boom":
            raise RuntimeError("decoder bug")
        if not data.isdigit():
            raise UndecodableMessage(f"not a number: {data!r}")
        return int(data)

    with pytest.raises(RuntimeError, match="decoder bug"):
        async with connect(nats_server.url) as bus, bus.subscribe_decoded("t.num", decode) as sub:
            bus.publish_nowait("t.num", b"abc")
            bus.publish_nowait("t.num", b"42")
            with trio.fail_after(5):
                assert (await sub.receive()).body == 42
            assert bus.stats.drops["undecodable"] == 1
            # An exception from inside nats-py's callback must reach this trio code.
            bus.publish_nowait("t.num", b"boom")
            with trio.fail_after(5):
                await trio.sleep_forever()


async def test_a_bus_used_outside_its_connect_block_fails_with_a_clear_error(
    nats_server: NatsServer,
) -> None:
    handed_send, handed_recv = trio.open_memory_channel[Bus](1)
    done = trio.Event()
    outside = r"called from a trio task started outside the `async with connect\(\.\.\.\)` block"

    async def started_before_connect() -> None:
        bus = await handed_recv.receive()
        with pytest.raises(BusOutsideConnect, match=r"Bus\.flush\(\) " + outside):
            await bus.flush()
        with pytest.raises(BusOutsideConnect, match=r"Bus\.request\('t\.nobody'\) " + outside):
            await bus.request("t.nobody", Ping(), Pong, timeout=1)
        with pytest.raises(BusOutsideConnect, match=r"Bus\.subscribe\('t\.out'\) " + outside):
            async with bus.subscribe("t.out"):
                pass
        # Publishing only queues for the bus's own flusher: it works from any task.
        bus.publish_nowait("t.out", Blob(label="from outside", data=b""))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(started_before_connect)
        async with connect(nats_server.url) as bus, bus.subscribe("t.out") as sub:
            await handed_send.send(bus)
            with trio.fail_after(10):
                await done.wait()
                await bus.flush()
                d = await sub.receive()
            assert isinstance(d.body, Blob) and d.body.label == "from outside"

    after = r"the bus to NATS at .* was used after its `async with connect\(\.\.\.\)` block ended"
    with pytest.raises(BusClosed, match=r"Bus\.publish_nowait to t\.late: " + after):
        bus.publish_nowait("t.late", Blob(label="late", data=b""))
    with pytest.raises(BusClosed, match=r"Bus\.publish to t\.late: " + after):
        await bus.publish("t.late", Blob(label="late", data=b""))
    with pytest.raises(BusClosed, match=r"Bus\.flush\(\): " + after):
        await bus.flush()
