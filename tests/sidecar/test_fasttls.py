"""FastTLS over real loopback sockets: full-duplex bulk transfer, refusals classified."""

from __future__ import annotations

import hashlib

import trio

from mesh import pki
from mesh.spiffe import SpiffeId
from sidecar.fasttls import FastTLS

TD = "t.mesh"


def svid(ca: pki.CertificateAuthority, sa: str) -> pki.Svid:
    ident = SpiffeId(TD, "shop", sa)
    key = pki.generate_key()
    return pki.Svid(ca.sign_csr(pki.build_csr(key, ident), ident), key)


async def pair(server_ctx: object, client_ctx: object) -> tuple[FastTLS, FastTLS]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = await listeners[0].accept()
    await listeners[0].aclose()
    assert isinstance(server_tcp, trio.SocketStream)
    server = FastTLS(server_tcp, server_ctx, server_side=True)  # type: ignore[arg-type]
    client = FastTLS(client_tcp, client_ctx, server_side=False)  # type: ignore[arg-type]
    return server, client


async def test_full_duplex_bulk_and_identity() -> None:
    ca = pki.generate_root(TD)
    a, b = svid(ca, "checkout"), svid(ca, "inventory")
    server, client = await pair(pki.server_context(b, ca.bundle),
                                pki.client_context(a, ca.bundle))
    size = 4_000_000
    payload = {"c": bytes(range(256)) * (size // 256), "s": b"s" * size}
    got: dict[str, hashlib._Hash] = {"c": hashlib.sha256(), "s": hashlib.sha256()}

    async def pump(src: FastTLS, dst: FastTLS, key: str) -> None:
        data = payload[key]
        for i in range(0, size, 100_000):
            await src.send_all(data[i:i + 100_000])

    async def drain(stream: FastTLS, key: str) -> None:
        n = 0
        while n < size:
            chunk = await stream.receive_some(65536)
            assert chunk
            got[key].update(chunk)
            n += len(chunk)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
        assert pki.check_peer_leaf(client.getpeercert(), trust_domain=TD,
                                   expected=b.identity) == b.identity
        assert pki.check_peer_leaf(server.getpeercert(), trust_domain=TD) == a.identity
        async with trio.open_nursery() as nursery:  # both directions at once, 4 tasks
            nursery.start_soon(pump, client, server, "c")
            nursery.start_soon(pump, server, client, "s")
            nursery.start_soon(drain, server, "c")
            nursery.start_soon(drain, client, "s")
    for key in ("c", "s"):
        assert got[key].digest() == hashlib.sha256(payload[key]).digest()
    await client.aclose()
    assert await server.receive_some() == b""  # EOF, no exception
    await server.aclose()


async def test_forged_client_refused_with_flag() -> None:
    ca = pki.generate_root(TD)
    stranger = pki.generate_root(TD)
    server, client = await pair(pki.server_context(svid(ca, "inventory"), ca.bundle),
                                pki.client_context(svid(stranger, "checkout"), ca.bundle))
    failure: list[BaseException] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as exc:
            failure.append(exc)
        await server.aclose()  # what the inbound gate does

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                await client.do_handshake()
                await client.receive_some()
            except trio.BrokenResourceError:
                pass
    refused = pki.classify_tls_failure(failure[0])
    assert refused is not None and refused.reason == "unknown-issuer"
    await client.aclose()


async def test_send_eof_is_a_half_close() -> None:
    """close_notify ends one direction only: the other keeps flowing (TLS 1.3)."""
    ca = pki.generate_root(TD)
    server, client = await pair(pki.server_context(svid(ca, "stock"), ca.bundle),
                                pki.client_context(svid(ca, "catalog"), ca.bundle))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            await client.do_handshake()
        await client.send_all(b"request")
        await client.send_eof()
        got = b""
        while chunk := await server.receive_some():
            got += chunk
        assert got == b"request"  # then EOF
        await server.send_all(b"response after the client's EOF")
        await server.send_eof()
        got = b""
        while chunk := await client.receive_some():
            got += chunk
        assert got == b"response after the client's EOF"
    await client.aclose()
    await server.aclose()
