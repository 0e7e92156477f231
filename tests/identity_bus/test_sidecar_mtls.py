"""CA-issued SVIDs through the sidecar's TLS seam: two sidecars over mTLS, strangers refused.

Uses the sidecar's public seam only (`Sidecar(..., inbound_ssl=, upstream_ssl=)`); the SPIFFE
ID checks inside the proxy are the sidecar's to wire (docs/identity.md, "Using the agent").
"""

from __future__ import annotations

import ssl

import trio
from identity_bus_helpers import Mesh

from mesh import pki
from mesh.snapshot import Snapshot
from mesh.spiffe import SpiffeId
from sidecar.server import Sidecar, SidecarOptions

REQUEST = b"GET /x HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"


async def tiny_app(*, task_status: trio.TaskStatus[int]) -> None:
    """Answers every request with 200 'ok' (keep-alive)."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"
                    )

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def http_get(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(REQUEST)
        out = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(65536):
                out += data
        return out


async def tls_get(port: int, ctx: ssl.SSLContext) -> bytes | BaseException:
    """A direct TLS client to a sidecar's inbound port."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname=None, https_compatible=True)
    out = b""
    try:
        with trio.fail_after(5):
            await stream.send_all(REQUEST)
            while data := await stream.receive_some(65536):
                out += data
    except trio.BrokenResourceError as exc:
        return exc
    finally:
        await trio.aclose_forcefully(stream)
    return out


def options(service: str, app_port: int) -> SidecarOptions:
    return SidecarOptions(
        service=service,
        version="v1",
        app_port=app_port,
        config=None,
        outbound_port=0,
        inbound_port=0,
        admin_port=0,
        watch_interval=3600,
    )


async def test_two_sidecars_over_mtls_with_ca_issued_svids(mesh: Mesh) -> None:
    reviews = await mesh.agent("shop", "reviews")
    productpage = await mesh.agent("shop", "productpage")
    async with trio.open_nursery() as nursery:
        app_port = await nursery.start(tiny_app)
        server = Sidecar(
            options("reviews", app_port),
            Snapshot.from_dict({"version": "1"}),
            inbound_ssl=reviews.server_context(),
        )
        server_ports = await nursery.start(server.run)
        inbound = server_ports["inbound"]
        client = Sidecar(
            options("productpage", 1),
            Snapshot.from_dict(
                {
                    "version": "1",
                    "services": [{"name": "reviews", "routes": [{}]}],
                    "clusters": [{"name": "reviews", "subsets": {"v1": [f"127.0.0.1:{inbound}"]}}],
                }
            ),
            upstream_ssl=productpage.client_context(),
        )
        client_ports = await nursery.start(client.run)

        reply = await http_get(client_ports["outbound"])
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"ok"), reply[:200]

        # A client presenting a valid SVID of this mesh gets through too...
        direct = await tls_get(inbound, productpage.client_context())
        assert isinstance(direct, bytes) and direct.startswith(b"HTTP/1.1 200 ")
        # ...a client with no certificate, or a forged one (self-signed, copied SPIFFE URI),
        # does not (STRICT: the handshake fails, no HTTP answer).
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.check_hostname = False
        anonymous.load_verify_locations(cadata=reviews.bundle.pem.decode())
        forged_key = pki.generate_key()
        stranger = pki.generate_root(reviews.trust_domain)
        ident = SpiffeId(reviews.trust_domain, "shop", "productpage")
        forged = pki.Svid(stranger.sign_csr(pki.build_csr(forged_key, ident), ident), forged_key)
        for ctx in (anonymous, pki.client_context(forged, reviews.bundle)):
            refused = await tls_get(inbound, ctx)
            assert isinstance(refused, BaseException) or refused == b"", refused
        nursery.cancel_scope.cancel()
