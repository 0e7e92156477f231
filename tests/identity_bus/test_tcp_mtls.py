"""Opaque TCP over mTLS between real `mesh sidecar` processes with CA-signed certificates:
bytes flow, a plaintext client is refused by a STRICT TCP inbound, and authorization by
caller identity lets one service in and closes another's connection."""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import Any

import trio
from identity_bus_helpers import TD, Mesh, ident
from mtls_procs import Proc, Procs, metric

from bus.server import NatsServer
from mesh import pki
from mesh.spiffe import SpiffeId

ECHO = Path(__file__).parent.parent / "sidecar" / "tcp_echo_app.py"


async def sidecar(mesh: Mesh, procs: Procs, nats: str, service: str, app_port: int,
                  snapshot: dict[str, Any], *extra: str) -> Proc:
    token_file = procs.tmp / f"token-{service}-{len(procs.procs)}"
    token_file.write_text(await mesh.token("shop", service))
    return await procs.sidecar(service, app_port, snapshot, "--nats", nats, "--identity",
                               ident(service), "--token-file", str(token_file), *extra)


def caller_snapshot(stock_inbound: int) -> dict[str, Any]:
    return {"version": "1",
            "clusters": [{"name": "stock", "subsets": {"v1": [f"127.0.0.1:{stock_inbound}"]}}],
            "tcp": [{"name": "stock", "port": 0, "cluster": "stock", "subset": "v1"}]}


async def echo(port: int, data: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    """Send `data`, read until as many bytes came back or the peer closed."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = tcp
    if ctx is not None:
        stream = trio.SSLStream(tcp, ctx, server_hostname=None)
    got = b""
    try:
        with trio.fail_after(10):
            await stream.send_all(data)
            while len(got) < len(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return got


async def test_tcp_over_mtls_plaintext_refused_and_authz_by_identity(
    nats_server: NatsServer, procs: Procs, mesh: Mesh
) -> None:
    nats = nats_server.url
    echo_port = int((await procs.spawn([sys.executable, str(ECHO)])).info["port"])
    stock = await sidecar(mesh, procs, nats, "stock", echo_port, {
        "version": "1",
        # An opaque TCP service that only checkout may reach; the path rule is HTTP-only and
        # so allows no TCP at all (as in Istio).
        "inbound": {"tcp": {}, "authz": {"rules": [
            {"action": "allow", "source": "checkout"},
            {"action": "allow", "source": "reviews", "path": {"prefix": "/"}}]}}})
    checkout = await sidecar(mesh, procs, nats, "checkout", 1, caller_snapshot(stock.inbound))
    reviews = await sidecar(mesh, procs, nats, "reviews", 1, caller_snapshot(stock.inbound))

    # Bytes flow over mTLS, both ways, through both sidecars.
    payload = bytes(range(256)) * 400
    assert await echo(checkout.info["tcp"]["stock"], payload) == payload
    assert await metric(stock.admin, "mesh_sidecar_tls_connections_total",
                        'direction="inbound",kind="mtls"') >= 1
    # A client's half-close crosses both TLS legs (close_notify) and the echo still answers.
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", checkout.info["tcp"]["stock"])
        async with stream:
            await stream.send_all(b"last words")
            await stream.send_eof()
            got = b""
            while chunk := await stream.receive_some(65536):
                got += chunk
    assert got == b"last words"
    # The destination saw the verified caller.
    src = 'reporter="destination",source_service="checkout"'
    with trio.fail_after(5):
        while await metric(stock.admin, "mesh_tcp_sent_bytes_total", src) < len(payload):
            await trio.sleep(0.05)

    # reviews has a valid certificate, but no TCP rule allows it: closed, logged, counted.
    assert await echo(reviews.info["tcp"]["stock"], b"hello") == b""
    denied = 'reporter="destination",source_service="reviews"'
    with trio.fail_after(5):
        while await metric(stock.admin, "mesh_tcp_connections_denied_total", denied) < 1:
            await trio.sleep(0.05)
    assert "[DENY]" in stock.stderr() and ident("reviews") in stock.stderr()
    assert await metric(stock.admin, "mesh_tcp_connections_opened_total", denied) == 0

    # Plaintext straight to the STRICT TCP inbound: refused before the app.
    assert await echo(stock.inbound, b"plain") == b""
    with trio.fail_after(5):
        while await metric(stock.admin, "mesh_sidecar_tls_refused_total",
                           'flag="plaintext"') < 1:
            await trio.sleep(0.05)

    # A TLS client with a valid SVID of checkout is served directly too.
    assert mesh.ca.ca is not None
    key = pki.generate_key()
    who = SpiffeId(TD, "shop", "checkout")
    good = pki.Svid(mesh.ca.ca.sign_csr(pki.build_csr(key, who), who), key)
    assert await echo(stock.inbound, b"direct", pki.client_context(good, mesh.ca.ca.bundle)) \
        == b"direct"
    # `source: checkout` is checkout in stock's own namespace: the same service account in
    # another namespace, with a valid SVID, is closed like any caller no rule allows.
    evil_id = SpiffeId(TD, "evil", "checkout")
    key = pki.generate_key()
    evil = pki.Svid(mesh.ca.ca.sign_csr(pki.build_csr(key, evil_id), evil_id), key)
    assert await echo(stock.inbound, b"evil", pki.client_context(evil, mesh.ca.ca.bundle)) == b""
    with trio.fail_after(5):
        while await metric(stock.admin, "mesh_tcp_connections_denied_total", src) < 1:
            await trio.sleep(0.05)

    # The caller refuses a server presenting another service's identity.
    imposter = await sidecar(mesh, procs, nats, "imposter", 1, {
        "version": "1",
        "clusters": [{"name": "stock", "identity": ident("ratings"),
                      "subsets": {"v1": [f"127.0.0.1:{stock.inbound}"]}}],
        "tcp": [{"name": "stock", "port": 0, "cluster": "stock", "subset": "v1"}]})
    assert await echo(imposter.info["tcp"]["stock"], b"x") == b""
    with trio.fail_after(5):
        while await metric(imposter.admin, "mesh_sidecar_tls_refused_total",
                           'flag="wrong-identity"') < 1:
            await trio.sleep(0.05)
