"""Signed bundle announcements on a real bus: forgeries and replays are ignored by a running
identity agent, while a genuine `mesh ca rotate` (overlap, then retire) is still followed.

The NATS here has no authorization on purpose: the signature must hold even when a hostile
client can publish on mesh.ca.bundle (a foreign cluster configured too loosely)."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding
from identity_bus_helpers import TD, Mesh

from actors.ca import KEY_BUNDLE, signing_root
from bus import subjects
from bus.client import connect
from bus.kv import open_kv
from bus.server import NatsServer
from mesh import pki
from mesh.messages import BundleAnnounce, CaCommand, CaCommandReply, decode_as
from mesh.pki_announce import sign_announcement
from sidecar.identity import IdentityAgent


async def command(mesh: Mesh, action: str, *, force: bool = False) -> CaCommandReply:
    return await mesh.bus.request(
        subjects.CA_COMMAND, CaCommand(action=action, force=force), CaCommandReply, timeout=5
    )


async def stored_announcement(mesh: Mesh) -> BundleAnnounce:
    entry = await (await open_kv(mesh.bus, subjects.KV_CA)).get(KEY_BUNDLE)
    assert entry is not None
    return decode_as(entry.value, BundleAnnounce)


async def rejected_after(agent: IdentityAgent, before: int, url: str, *msgs: BundleAnnounce) -> None:
    """Publish ``msgs`` from another client; wait until the agent has rejected each."""
    async with connect(url, name="forger") as forger:
        for msg in msgs:
            await forger.publish(subjects.CA_BUNDLE, msg)
        await forger.flush()
    with trio.fail_after(10):
        while agent.rejected_bundles < before + len(msgs):
            await trio.sleep(0.02)


async def test_forged_and_replayed_bundles_are_ignored_real_rotation_is_followed(
    mesh: Mesh, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.identity")
    agent = await mesh.agent("shop", "checkout", rekey_spread=0.2)
    trusted, generation = agent.bundle, agent.generation
    before_rotation = await stored_announcement(mesh)
    assert before_rotation.signatures  # the CA signs what it stores and announces

    attacker = pki.generate_root(TD)
    evil = BundleAnnounce(
        trust_domain=TD,
        roots_pem=trusted.pem + attacker.bundle.pem,
        signing_ca=attacker.certificate.public_bytes(Encoding.DER),
        leader="cp-evil",
        issued_at=time.time() + 3600,
    )
    forged = sign_announcement(evil, [(attacker.certificate, attacker.key)])
    # The genuine root's certificate named as signer, the attacker's signature.
    assert mesh.ca.ca is not None
    genuine_root = signing_root(mesh.ca.ca).public_bytes(Encoding.DER)
    borrowed = dataclasses.replace(forged, signers=[genuine_root])
    await rejected_after(agent, 0, nats_server.url, evil, forged, borrowed)
    assert agent.bundle == trusted and agent.generation == generation
    assert "ignoring a bundle announcement (from 'cp-evil')" in caplog.text
    assert "not signed" in caplog.text and "not signed by a trusted root" in caplog.text

    # A genuine rotation is still accepted: the old root signs the overlap bundle.
    rotated = await command(mesh, "rotate")
    assert rotated.ok, rotated.message
    new_root = signing_root(mesh.ca.ca)
    with trio.fail_after(10):
        while not (
            len(agent.bundle) == 2 and agent.svid.issued.certificate.issuer == new_root.subject
        ):
            await trio.sleep(0.05)
    overlap = await stored_announcement(mesh)
    assert len(overlap.signatures) == 2  # old root and new root

    retired = await command(mesh, "retire", force=True)
    assert retired.ok, retired.message
    with trio.fail_after(10):
        while len(agent.bundle) != 1:
            await trio.sleep(0.05)
    assert agent.bundle.fingerprints() == [pki.fingerprint(new_root)]

    # Replaying genuine but old announcements cannot bring the retired root back.
    rejected = agent.rejected_bundles
    await rejected_after(agent, rejected, nats_server.url, before_rotation, overlap)
    assert agent.bundle.fingerprints() == [pki.fingerprint(new_root)]
    assert "a replay" in caplog.text
