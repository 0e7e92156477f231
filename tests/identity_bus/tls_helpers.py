"""One real mTLS exchange over loopback with trio.SSLStream and the agents' contexts."""

from __future__ import annotations

import ssl

import trio

from mesh import pki
from mesh.spiffe import SpiffeId


async def mtls_exchange(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    trust_domain: str,
    *,
    expect_server: SpiffeId | None = None,
) -> SpiffeId | BaseException:
    """Server accepts one connection; returns the client SPIFFE ID the server saw (after the
    client also checked the server and got an echo), or the error the server raised."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[SpiffeId | BaseException] = []
    echo = b""

    async def serve() -> None:
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            ident = await pki.handshake_and_check(stream, trust_domain=trust_domain)
            await stream.send_all(ident.uri.encode())
            seen.append(ident)
        except (trio.BrokenResourceError, pki.CertificateRefused) as exc:
            seen.append(exc)
        await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            client = trio.SSLStream(tcp, client_ctx, server_hostname=None)
            try:
                await pki.handshake_and_check(
                    client, trust_domain=trust_domain, expected=expect_server
                )
                echo = await client.receive_some(4096)
            except (trio.BrokenResourceError, pki.CertificateRefused):
                pass
            await trio.aclose_forcefully(client)
    for listener in listeners:
        await listener.aclose()
    assert isinstance(seen[0], BaseException) or echo == seen[0].uri.encode()
    return seen[0]
