"""mTLS between real `mesh sidecar` processes with certificates from a real CA actor.

The CA actor runs in the test process on a real nats-server; apps and sidecars are real
processes (tests/sidecar/app_server.py and `mesh sidecar --identity ... --token ...`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from identity_bus_helpers import TD, Mesh, ident, running_mesh
from mtls_procs import Proc, Procs, admin_get, http, metric

from bus import subjects
from bus.server import NatsServer
from mesh import pki, pki_ca
from mesh.messages import CaCommand, CaCommandReply
from mesh.spiffe import SpiffeId


async def start_sidecar(mesh: Mesh, procs: Procs, nats: str, service: str, app_port: int,
                        snapshot: dict[str, Any], *extra: str, by_namespace: bool = False
                        ) -> Proc:
    token_file = procs.tmp / f"token-{service}-{len(procs.procs)}"
    token_file.write_text(await mesh.token("shop", service))
    # --namespace: the trust domain is the running CA's, the service account --service
    who = ["--namespace", "shop"] if by_namespace else ["--identity", ident(service)]
    return await procs.sidecar(service, app_port, snapshot, "--nats", nats, *who,
                               "--token-file", str(token_file), *extra)


def client_snapshot(**targets: tuple[int, str | None]) -> dict[str, Any]:
    """Routes `host -> cluster host` to one inbound port, optionally with an expected ID."""
    services, clusters = [], []
    for name, (port, expected) in targets.items():
        services.append({"name": name, "routes": [{}]})
        cluster: dict[str, Any] = {"name": name, "subsets": {"v1": [f"127.0.0.1:{port}"]},
                                   "circuit_breaker": {"max_requests_per_connection": 20}}
        if expected is not None:
            cluster["identity"] = expected
        clusters.append(cluster)
    return {"version": "1", "services": services, "clusters": clusters}


def app_headers(body: bytes) -> dict[str, str]:
    headers: dict[str, str] = json.loads(body)["headers"]
    return headers


async def test_mtls_identity_refusals_and_authz(nats_server: NatsServer, procs: Procs,
                                                mesh: Mesh) -> None:
    nats = nats_server.url
    inv_app = await procs.app("inventory")
    inventory = await start_sidecar(mesh, procs, nats, "inventory", inv_app, {
        "version": "1",
        # AuthorizationPolicy: only checkout may call inventory.
        "inbound": {"authz": {"rules": [{"action": "allow", "source": "checkout"}]}}})
    rev_app = await procs.app("reviews")
    reviews = await start_sidecar(mesh, procs, nats, "reviews", rev_app,
                                  client_snapshot(inventory=(inventory.inbound, None)))
    checkout = await start_sidecar(mesh, procs, nats, "checkout", 1, client_snapshot(
        inventory=(inventory.inbound, None),
        # a cluster whose endpoint presents a valid certificate of another service
        imposter=(reviews.inbound, ident("inventory"))))

    # Two sidecars over mTLS; the app sees the caller's verified identity, and a
    # self-declared source is replaced.
    status, hdrs, body = await http(checkout.outbound, headers={
        "x-mesh-peer-identity": ident("admin"), "x-mesh-source": "admin"})
    assert status == 200, (status, hdrs, body)
    seen = app_headers(body)
    assert seen["x-mesh-peer-identity"] == ident("checkout")
    assert seen["x-mesh-source"] == "checkout"

    # Authorization: reviews -> inventory is not allowed.
    status, hdrs, body = await http(reviews.outbound)
    assert status == 403 and hdrs["x-mesh-flags"] == "DENY", (status, hdrs, body)
    assert ident("reviews") in hdrs["x-mesh-reason"]

    # A valid certificate of the wrong service is refused by the client side.
    status, hdrs, body = await http(checkout.outbound, host="imposter")
    assert status == 503 and hdrs["x-mesh-flags"].startswith("UF"), (status, hdrs)
    assert "wrong-identity" in hdrs["x-mesh-reason"], hdrs
    assert await metric(checkout.admin, "mesh_sidecar_tls_refused_total",
                        'flag="wrong-identity"') >= 1

    # Straight to inventory's inbound port: plaintext, a forged certificate (self-signed
    # root, copied SPIFFE URI) and an expired certificate are refused before any HTTP.
    assert mesh.ca.ca is not None
    bundle = mesh.ca.ca.bundle
    checkout_id = SpiffeId(TD, "shop", "checkout")
    stranger = pki.generate_root(TD)
    key = pki.generate_key()
    forged = pki.Svid(stranger.sign_csr(pki.build_csr(key, checkout_id), checkout_id), key)
    key = pki.generate_key()
    expired = pki.Svid(mesh.ca.ca.sign_csr(pki.build_csr(key, checkout_id), checkout_id,
                                           ttl=timedelta(hours=1),
                                           now=datetime.now(UTC) - timedelta(days=2)), key)
    assert (await http(inventory.inbound))[0] == 0  # plaintext: STRICT closes it
    for svid in (forged, expired):
        status, _, _ = await http(inventory.inbound, ctx=pki.client_context(svid, bundle))
        assert status == 0
    with trio.fail_after(5):
        while await metric(inventory.admin, "mesh_sidecar_tls_refused_total",
                           'direction="inbound"') < 3:
            await trio.sleep(0.05)
    for flag in ("unknown-issuer", "expired", "plaintext"):
        assert await metric(inventory.admin, "mesh_sidecar_tls_refused_total",
                            f'flag="{flag}"') == 1, flag
        assert f"[{flag}]" in inventory.stderr()
    # A flood of plaintext connections is counted in full but logged a few lines per window,
    # so anyone who can reach the port cannot fill the sidecar's log.
    for _ in range(30):
        assert (await http(inventory.inbound))[0] == 0
    with trio.fail_after(10):
        while await metric(inventory.admin, "mesh_sidecar_tls_refused_total",
                           'flag="plaintext"') < 31:
            await trio.sleep(0.05)
    assert 1 < inventory.stderr().count("[plaintext]") <= 5, inventory.stderr()
    # A client with a valid SVID of this mesh is served directly too.
    key = pki.generate_key()
    good = pki.Svid(mesh.ca.ca.sign_csr(pki.build_csr(key, checkout_id), checkout_id), key)
    status, _, body = await http(inventory.inbound, ctx=pki.client_context(good, bundle))
    assert status == 200 and app_headers(body)["x-mesh-peer-identity"] == ident("checkout")
    # The policy's bare `source: checkout` means checkout in inventory's own namespace: a
    # valid SVID of the same service account in another namespace is another caller.
    evil_id = SpiffeId(TD, "evil", "checkout")
    key = pki.generate_key()
    evil = pki.Svid(mesh.ca.ca.sign_csr(pki.build_csr(key, evil_id), evil_id), key)
    status, hdrs, _ = await http(inventory.inbound, ctx=pki.client_context(evil, bundle))
    assert status == 403 and hdrs["x-mesh-flags"] == "DENY", (status, hdrs)
    assert evil_id.uri in hdrs["x-mesh-reason"]

    # Admin: /certs (chain + bundle, never the key) and the expiry gauge.
    status, body = await admin_get(inventory.admin, "/certs")
    certs = json.loads(body)
    assert status == 200 and certs["identity"] == ident("inventory")
    assert "BEGIN CERTIFICATE" in certs["chain_pem"] and "BEGIN CERTIFICATE" in certs["bundle_pem"]
    assert b"PRIVATE KEY" not in body
    left = await metric(inventory.admin, "mesh_sidecar_cert_seconds_to_expiry")
    assert 3000 < left <= 3600


async def test_permissive_accepts_plaintext_and_mtls(nats_server: NatsServer, procs: Procs,
                                                     mesh: Mesh) -> None:
    inv_app = await procs.app("inventory")
    inventory = await start_sidecar(mesh, procs, nats_server.url, "inventory", inv_app,
                                    {"version": "1"}, "--mtls", "PERMISSIVE")
    checkout = await start_sidecar(mesh, procs, nats_server.url, "checkout", 1,
                                   client_snapshot(inventory=(inventory.inbound, None)),
                                   by_namespace=True)
    status, _, body = await http(checkout.outbound)
    assert status == 200 and app_headers(body)["x-mesh-peer-identity"] == ident("checkout")
    # Big bodies both ways and an upgraded tunnel, over mTLS between the sidecars.
    size = 3_000_000
    reply = await raw(checkout.outbound, b"POST /count HTTP/1.1\r\nhost: inventory\r\n"
                      b"content-length: %d\r\nconnection: close\r\n\r\n" % size
                      + b"x" * size)
    assert reply.startswith(b"HTTP/1.1 200") and b'"received": %d' % size in reply, reply[:300]
    status, _, body = await http(checkout.outbound, f"/bytes/{size}")
    assert status == 200 and len(body) == size
    echo = await raw(checkout.outbound, b"GET /echo-upgrade HTTP/1.1\r\nhost: inventory\r\n"
                     b"connection: upgrade\r\nupgrade: echo\r\n\r\n", b"ping over mTLS")
    assert echo.startswith(b"HTTP/1.1 101") and echo.endswith(b"ping over mTLS"), echo
    # Plaintext is let through, with no verified identity (a forged header is dropped).
    status, _, body = await http(inventory.inbound, headers={
        "x-mesh-peer-identity": ident("checkout")})
    assert status == 200 and "x-mesh-peer-identity" not in app_headers(body)


async def raw(port: int, data: bytes, then: bytes = b"") -> bytes:
    """Send `data` (and `then` once something came back), read until EOF or quiet."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        with trio.fail_after(15):
            await stream.send_all(data)
            if then:
                out += await stream.receive_some(65536)
                await stream.send_all(then)
                while not out.endswith(then):
                    out += await stream.receive_some(65536)
                return out
            while chunk := await stream.receive_some(65536):
                out += chunk
    return out


async def test_no_certificate_no_start(nats_server: NatsServer, procs: Procs,
                                       mesh: Mesh) -> None:
    path = procs.tmp / "snap.yaml"
    path.write_text("version: '1'\n")
    code, err = await procs.run_to_exit([
        *_sidecar_cmd(path), "--nats", nats_server.url, "--identity", ident("checkout"),
        "--token", "tmj1.0123456789abcdef.bad", "--identity-timeout", "5"])
    assert code == 1, err
    errors = [x for x in err.splitlines() if "error:" in x]
    assert len(errors) == 1 and "join token" in errors[0], err
    assert "Traceback" not in err


async def test_no_ca_no_start(nats_server: NatsServer, procs: Procs) -> None:
    path = procs.tmp / "snap.yaml"
    path.write_text("version: '1'\n")
    code, err = await procs.run_to_exit([
        *_sidecar_cmd(path), "--nats", nats_server.url, "--identity", ident("checkout"),
        "--token", "tmj1.0123456789abcdef.x", "--identity-timeout", "2"])
    errors = [x for x in err.splitlines() if "error:" in x]
    assert code == 1 and len(errors) == 1, err
    assert "no certificate for " + ident("checkout") in errors[0] and "within 2s" in errors[0]
    assert "Traceback" not in err


def _sidecar_cmd(path: Path) -> list[str]:
    from mtls_procs import MESH

    return [MESH, "sidecar", "--service", "checkout", "--app-port", "1", "--config",
            str(path), "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"]


class Load:
    """c workers sending requests through a sidecar, bounded in count and time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[tuple[int, str]] = []
        self.stop = False

    async def worker(self, limit: int) -> None:
        while not self.stop and self.ok + len(self.failed) < limit:
            status, hdrs, body = await http(self.port)
            if status == 200:
                self.ok += 1
            else:
                self.failed.append((status, hdrs.get("x-mesh-reason", body[:200].decode())))

    async def run(self, *, workers: int, limit: int, seconds: float) -> None:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(self.worker, limit)
        self.stop = True


async def serial(proc: Proc) -> str:
    _, body = await admin_get(proc.admin, "/certs")
    return str(json.loads(body)["serial"])


async def watch_serials(procs_: list[Proc], seen: list[set[str]], load: Load) -> None:
    while not load.stop:
        for p, s in zip(procs_, seen, strict=True):
            s.add(await serial(p))
        await trio.sleep(0.2)


async def test_short_ttl_rotation_under_load(nats_server: NatsServer, procs: Procs,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pki_ca, "MIN_LEAF_TTL", timedelta(seconds=1))
    async with running_mesh(nats_server.url, leaf_ttl=timedelta(seconds=4)) as mesh:
        inv_app = await procs.app("inventory")
        inventory = await start_sidecar(mesh, procs, nats_server.url, "inventory", inv_app,
                                        {"version": "1"})
        checkout = await start_sidecar(mesh, procs, nats_server.url, "checkout", 1,
                                       client_snapshot(inventory=(inventory.inbound, None)))
        load = Load(checkout.outbound)
        seen: list[set[str]] = [set(), set()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_serials, [inventory, checkout], seen, load)
            await load.run(workers=4, limit=20000, seconds=9)
        assert load.failed == [] and load.ok > 200, (load.ok, load.failed[:5])
        # Certificates of 4 s renew every ~2 s: several rotations on both sides...
        assert min(len(s) for s in seen) >= 3, seen
        # ...and new connections kept being made with them (20 requests per connection).
        assert await metric(inventory.admin, "mesh_sidecar_tls_connections_total",
                            'kind="mtls"') >= load.ok // 20 - 5


async def test_ca_rotate_under_load(nats_server: NatsServer, procs: Procs,
                                    mesh: Mesh) -> None:
    inv_app = await procs.app("inventory")
    inventory = await start_sidecar(mesh, procs, nats_server.url, "inventory", inv_app,
                                    {"version": "1"})
    checkout = await start_sidecar(mesh, procs, nats_server.url, "checkout", 1,
                                   client_snapshot(inventory=(inventory.inbound, None)))
    before = [await serial(inventory), await serial(checkout)]
    load = Load(checkout.outbound)

    async def rotate() -> None:
        async def command(action: str) -> CaCommandReply:
            return await mesh.bus.request(subjects.CA_COMMAND,
                                          CaCommand(action=action, force=True),
                                          CaCommandReply, timeout=5)

        await trio.sleep(1)
        assert (await command("rotate")).ok
        with trio.fail_after(15):  # both re-issued by the new root (rekey within ~5 s)
            while True:
                now = [await serial(inventory), await serial(checkout)]
                if now[0] != before[0] and now[1] != before[1]:
                    break
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        assert (await command("retire")).ok
        await trio.sleep(1.5)
        load.stop = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rotate)
        await load.run(workers=4, limit=50000, seconds=25)
    assert load.failed == [] and load.ok > 100, (load.ok, load.failed[:5])
    status, body = await admin_get(inventory.admin, "/certs")
    assert status == 200 and json.loads(body)["bundle_pem"].count("BEGIN CERTIFICATE") == 1
