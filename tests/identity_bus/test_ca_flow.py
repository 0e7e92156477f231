"""The CSR flow over real NATS: tokens, refusals with reasons, renewal, mTLS after renewal."""

from __future__ import annotations

import ssl
from datetime import timedelta

import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from identity_bus_helpers import SECRET, TD, Mesh, running_mesh
from tls_helpers import mtls_exchange

from actors.ca import CaActor
from actors.ca_config import CaConfig, KvTokenStore
from actors.runtime import ActorContext
from bus import subjects
from bus.client import connect
from bus.kv import open_kv
from bus.server import NatsServer
from mesh import pki, pki_ca
from mesh.cli.token_cmd import create_token
from mesh.concurrency import unwrap_single
from mesh.messages import CsrReply, CsrRequest
from mesh.pki_errors import TokenReplayed, TokenRevoked, TokenUnknown, TokenWrongIdentity
from mesh.spiffe import SpiffeId
from mesh.tokens import revoke_token
from sidecar.identity import IdentityAgent

CHECKOUT = SpiffeId(TD, "shop", "checkout")
REVIEWS = SpiffeId(TD, "shop", "reviews")


async def first_certificate(agent: IdentityAgent, mesh: Mesh) -> None:
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run, mesh.bus)


async def ask(mesh: Mesh, req: CsrRequest) -> CsrReply:
    return await mesh.bus.request(subjects.CA_SIGN, req, CsrReply, timeout=5)


async def test_token_gives_a_valid_svid_and_the_bundle(mesh: Mesh) -> None:
    agent = await mesh.agent("shop", "checkout", name="checkout-1")
    svid = agent.svid
    assert svid.identity == CHECKOUT
    assert pki.verify_svid(svid.issued.chain, agent.bundle, expected=CHECKOUT) == CHECKOUT
    assert mesh.ca.ca is not None and agent.bundle == mesh.ca.ca.bundle
    status = agent.status()
    assert status.identity == CHECKOUT.uri and status.serial == svid.issued.serial_hex
    assert 3500 < status.seconds_left <= 3600


async def test_csr_for_a_foreign_identity_is_refused_with_the_reason(mesh: Mesh) -> None:
    token = await mesh.token("shop", "checkout")
    key = pki.generate_key()
    # The token allows checkout; the CSR asks for reviews.
    reply = await ask(mesh, CsrRequest(CHECKOUT.uri, pki.build_csr(key, REVIEWS), token=token))
    assert not reply.ok and reply.reason == "csr-wrong-identity"
    assert "asks for 'spiffe://test.mesh/ns/shop/sa/reviews'" in reply.message
    assert "only allows spiffe://test.mesh/ns/shop/sa/checkout" in reply.message
    # Claiming reviews outright with checkout's token: the token says no. Through the agent,
    # the sidecar gets the typed error with the CA's message.
    agent = IdentityAgent(REVIEWS, token=token)
    with pytest.raises(TokenWrongIdentity, match=r"is for spiffe://test\.mesh/ns/shop/sa/checkout"):
        await first_certificate(agent, mesh)
    assert agent.last_error.startswith("token-wrong-identity")
    # The refused attempts spent nothing: the token still works for checkout.
    reply = await ask(mesh, CsrRequest(CHECKOUT.uri, pki.build_csr(key, CHECKOUT), token=token))
    assert reply.ok


async def test_unknown_and_replayed_tokens_are_refused(mesh: Mesh) -> None:
    token = await mesh.token("shop", "checkout")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(TokenUnknown, match="unknown or its secret is wrong"):
        await first_certificate(IdentityAgent(CHECKOUT, token=forged), mesh)
    first = IdentityAgent(CHECKOUT, token=token)
    await mesh.nursery.start(first.run, mesh.bus)
    with trio.fail_after(5):
        await first.wait_ready()
    # The same token again, from another sidecar (another key): replay.
    with pytest.raises(TokenReplayed, match="already used 1 time"):
        await first_certificate(IdentityAgent(CHECKOUT, token=token), mesh)
    # No credential at all, and a renewal proof made with another key: refused.
    key = pki.generate_key()
    csr = pki.build_csr(key, CHECKOUT)
    reply = await ask(mesh, CsrRequest(CHECKOUT.uri, csr))
    assert not reply.ok and reply.reason == "csr-refused" and "no credential" in reply.message
    # A stolen chain with a proof made by another key than the chain's.
    proof = key.sign(b"x" + csr, ec.ECDSA(hashes.SHA256()))
    stolen = CsrRequest(CHECKOUT.uri, csr, chain=list(first.svid.issued.chain_der), proof=proof)
    reply = await ask(mesh, stolen)
    assert not reply.ok and reply.reason == "renewal-proof-invalid"
    assert mesh.ca.refused == 4


async def test_short_ttl_agents_renew_repeatedly_and_mtls_keeps_working(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The core refuses leaves under one minute; lift that floor here only, to see several
    # renewals in seconds instead of minutes.
    monkeypatch.setattr(pki_ca, "MIN_LEAF_TTL", timedelta(seconds=1))
    async with running_mesh(nats_server.url, leaf_ttl=timedelta(seconds=3)) as mesh:
        client = await mesh.agent("shop", "checkout")
        server = await mesh.agent("shop", "inventory")
        inventory = server.identity
        handed: list[ssl.SSLContext] = []
        client.add_change_listener(lambda agent: handed.append(agent.client_context()))
        serials = {client.svid.issued.serial, server.svid.issued.serial}
        with trio.fail_after(20):
            while client.renewals < 3 or server.renewals < 3:
                gen = (client.generation, server.generation)
                while (client.generation, server.generation) == gen:
                    await trio.sleep(0.05)
                # After every renewal: new connections use the new certificates.
                seen = await mtls_exchange(
                    server.server_context(),
                    client.client_context(),
                    TD,
                    expect_server=inventory,
                )
                assert seen == CHECKOUT, seen
                serials |= {client.svid.issued.serial, server.svid.issued.serial}
        assert len(serials) >= 8
        assert handed and handed[-1] is client.client_context()
        assert client.failures == 0 and server.failures == 0


async def test_renewal_retries_with_backoff_while_the_ca_is_down(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pki_ca, "MIN_LEAF_TTL", timedelta(seconds=1))
    config = CaConfig(secret=SECRET, trust_domain=TD, leaf_ttl=timedelta(seconds=4), lease_ttl=1.0)
    async with connect(nats_server.url) as bus, trio.open_nursery() as nursery:
        async with trio.open_nursery() as ca_nursery:
            first_ca = CaActor(config)
            await ca_nursery.start(first_ca.run, ActorContext(bus=bus, replica="cp-a"))
            with trio.fail_after(10):
                await first_ca.leading.wait()
            token, _ = await create_token(bus, CHECKOUT)
            agent = IdentityAgent(CHECKOUT, token=token, request_timeout=0.5)
            await nursery.start(agent.run, bus)
            with trio.fail_after(10):
                await agent.wait_ready()
            ca_nursery.cancel_scope.cancel()  # the CA goes away (clean stop: lease released)
        serial = agent.svid.issued.serial
        with trio.fail_after(10):
            while agent.failures < 2:
                await trio.sleep(0.05)
        assert agent.last_error.startswith("CaUnavailable") and agent.renewals == 0
        assert agent.svid.issued.serial == serial  # still serving with the current certificate
        # A CA comes back (another replica): it unseals the same CA and the agent renews.
        second_ca = CaActor(config)
        await nursery.start(second_ca.run, ActorContext(bus=bus, replica="cp-b"))
        with trio.fail_after(10):
            while agent.renewals < 1:
                await trio.sleep(0.05)
        assert agent.svid.issued.serial != serial and agent.last_error == ""
        assert second_ca.ca is not None and first_ca.ca is None
        pki.verify_svid(agent.svid.issued.chain, second_ca.ca.bundle, expected=CHECKOUT)
        nursery.cancel_scope.cancel()


async def test_revoked_token_is_refused(mesh: Mesh) -> None:
    token = await mesh.token("shop", "checkout")
    store = KvTokenStore(await open_kv(mesh.bus, subjects.KV_TOKENS))
    token_id = token.split(".")[1]
    got = await store.get(token_id)
    assert got is not None
    assert await store.put(revoke_token(got[0]), revision=got[1])
    with pytest.raises(TokenRevoked, match=f"join token {token_id} was revoked"):
        await first_certificate(IdentityAgent(CHECKOUT, token=token), mesh)
