"""Opaque TCP pieces without processes: authorization by identity (pure) and the splice's
idle timeout and byte counts over real loopback sockets."""

from __future__ import annotations

import trio

from mesh.snapshot import Authz, AuthzRule, StringMatch
from mesh.spiffe import SpiffeId
from sidecar.splice import ByteCount, splice
from sidecar.tcp_authz import check_tcp

CHECKOUT = SpiffeId("td", "shop", "checkout")
REVIEWS = SpiffeId("td", "shop", "reviews")
OTHER_NS = SpiffeId("td", "ops", "checkout")


def test_tcp_authz_matches_identity_fields_and_never_allows_by_http_only_rules() -> None:
    assert check_tcp(None, None) is None
    only_checkout = Authz(rules=(AuthzRule("allow", source="checkout"),))
    assert check_tcp(only_checkout, CHECKOUT, "shop") is None
    reason = check_tcp(only_checkout, REVIEWS, "shop")
    assert reason is not None and "spiffe://td/ns/shop/sa/reviews" in reason
    assert check_tcp(only_checkout, None) is not None  # plaintext: no identity to match
    # An allow rule with an HTTP-only field allows no TCP, whoever calls.
    by_path = Authz(rules=(AuthzRule("allow", source="reviews", path=StringMatch(prefix="/")),))
    assert check_tcp(by_path, REVIEWS) is not None
    # A deny rule with HTTP-only fields denies on its identity fields alone (fail closed).
    deny = Authz(rules=(AuthzRule("deny", namespace="ops", methods=("POST",)),))
    reason = check_tcp(deny, OTHER_NS)
    assert reason is not None and "HTTP-only" in reason
    assert check_tcp(deny, CHECKOUT) is None
    assert check_tcp(Authz(default="deny"), CHECKOUT) is not None
    by_id = Authz(rules=(AuthzRule("allow", identity=CHECKOUT.uri),))
    assert check_tcp(by_id, CHECKOUT) is None and check_tcp(by_id, OTHER_NS) is not None


def test_tcp_authz_scopes_a_bare_source_to_the_sidecars_own_namespace() -> None:
    frontend = SpiffeId("td", "shop", "frontend")
    evil_frontend = SpiffeId("td", "evil", "frontend")
    allow = Authz(rules=(AuthzRule("allow", source="frontend"),))
    assert check_tcp(allow, frontend, "shop") is None
    reason = check_tcp(allow, evil_frontend, "shop")
    assert reason is not None and evil_frontend.uri in reason
    explicit = Authz(rules=(AuthzRule("allow", source="frontend", namespace="evil"),))
    assert check_tcp(explicit, evil_frontend, "shop") is None
    assert check_tcp(explicit, frontend, "shop") is not None
    deny = Authz(rules=(AuthzRule("deny", source="frontend"),))
    assert check_tcp(deny, frontend, "shop") is not None
    assert check_tcp(deny, evil_frontend, "shop") is None
    # Own namespace unknown: a bare source cannot be scoped, so fail closed both ways.
    assert check_tcp(allow, frontend, None) is not None
    assert check_tcp(deny, evil_frontend, None) is not None


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one real loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


async def test_splice_counts_bytes_and_closes_both_sides_when_idle() -> None:
    # app_a <-> (a | splice | b) <-> app_b
    app_a, a = await _pair()
    b, app_b = await _pair()
    up, down = ByteCount(), ByteCount()
    result: list[bool] = []

    async def run() -> None:
        result.append(await splice(a, b, idle_timeout=0.3, a_to_b=up, b_to_a=down))
        await a.aclose()
        await b.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await app_a.send_all(b"ping" * 100)
            got = b""
            while len(got) < 400:
                got += await app_b.receive_some()
            await app_b.send_all(b"pong")
            assert await app_a.receive_some() == b"pong"
            # Then silence: the splice closes both sides on its own.
            assert await app_a.receive_some() == b""
            assert await app_b.receive_some() == b""
    assert result == [True]
    assert (up.n, down.n) == (400, 4)
    await app_a.aclose()
    await app_b.aclose()


async def test_splice_without_idle_timeout_ends_on_close_not_idleness() -> None:
    app_a, a = await _pair()
    b, app_b = await _pair()
    result: list[bool] = []

    async def run() -> None:
        result.append(await splice(a, b, idle_timeout=None))
        await a.aclose()
        await b.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await app_a.send_all(b"x")
            assert await app_b.receive_some() == b"x"
            await app_a.send_eof()  # the half-close is passed on
            assert await app_b.receive_some() == b""
            await app_b.send_all(b"y")  # the other way still works
            assert await app_a.receive_some() == b"y"
            await app_b.aclose()
    assert result == [False]
    await app_a.aclose()


async def test_a_snapshot_applied_while_the_first_listeners_bind_wins() -> None:
    """update() may run (from sync code) while start() is still binding the first set: a
    listener it removed must neither crash start() nor be started by it afterwards."""
    from mesh.snapshot import TcpProxy
    from sidecar.tcp_proxy import TcpListeners

    class Idle:
        async def handle(self, stream: trio.SocketStream) -> None:
            await stream.aclose()

    a, b = TcpProxy("a", 0, "a", "default"), TcpProxy("b", 0, "b", "default")
    for yields in range(4):  # where, during start(), the new snapshot lands
        listeners = TcpListeners(lambda t: Idle())  # type: ignore[arg-type,return-value]
        async with trio.open_nursery() as nursery:

            async def remove_all(ls: TcpListeners = listeners, n: int = yields) -> None:
                for _ in range(n):
                    await trio.lowlevel.checkpoint()
                ls.update(())

            nursery.start_soon(remove_all)
            await listeners.start(nursery, (a, b))
            await trio.testing.wait_all_tasks_blocked()
            assert listeners.ports == {} and not listeners._running, yields
            nursery.cancel_scope.cancel()
