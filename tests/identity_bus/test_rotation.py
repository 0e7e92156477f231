"""`mesh ca rotate` semantics on a real CA actor: overlap, re-issue, retire."""

from __future__ import annotations

import trio
from identity_bus_helpers import TD, Mesh
from tls_helpers import mtls_exchange

from actors.ca import signing_root
from bus import subjects
from mesh import pki
from mesh.messages import CaCommand, CaCommandReply
from mesh.spiffe import SpiffeId


async def command(mesh: Mesh, action: str, *, force: bool = False) -> CaCommandReply:
    return await mesh.bus.request(
        subjects.CA_COMMAND, CaCommand(action=action, force=force), CaCommandReply, timeout=5
    )


async def test_rotate_overlap_then_retire(mesh: Mesh) -> None:
    checkout = await mesh.agent("shop", "checkout", rekey_spread=0.2)
    inventory = await mesh.agent("shop", "inventory", rekey_spread=0.2)
    assert mesh.ca.ca is not None
    old_root = signing_root(mesh.ca.ca)
    old_fp = pki.fingerprint(old_root)
    old_svid = checkout.svid  # a leaf of the old root, kept for the checks below

    status = await command(mesh, "status")
    assert status.ok and status.roots == [old_fp] and status.signing_root == old_fp
    assert (await command(mesh, "retire")).reason == "no-rotation"

    # Step 1: a new root signs; both are trusted.
    rotated = await command(mesh, "rotate")
    assert rotated.ok, rotated.message
    new_fp = rotated.signing_root
    assert new_fp != old_fp and set(rotated.roots) == {old_fp, new_fp}
    again = await command(mesh, "rotate")
    assert not again.ok and again.reason == "rotation-in-progress"

    # Agents learn the overlap bundle and renew early with the new root.
    new_root = signing_root(mesh.ca.ca)
    with trio.fail_after(10):
        for agent in (checkout, inventory):
            while not (
                len(agent.bundle) == 2 and agent.svid.issued.certificate.issuer == new_root.subject
            ):
                await trio.sleep(0.05)
    overlap = inventory.bundle
    pki.verify_svid(old_svid.issued.chain, overlap, expected=checkout.identity)
    pki.verify_svid(checkout.svid.issued.chain, overlap, expected=checkout.identity)
    # During the overlap a client still on the old root talks to a server on the new one.
    old_client = pki.client_context(old_svid, overlap)
    seen = await mtls_exchange(
        inventory.server_context(), old_client, TD, expect_server=inventory.identity
    )
    assert seen == checkout.identity
    seen = await mtls_exchange(
        inventory.server_context(),
        checkout.client_context(),
        TD,
        expect_server=inventory.identity,
    )
    assert seen == checkout.identity

    # Step 2: retire. Too early without --force (old leaves may still be valid).
    early = await command(mesh, "retire")
    assert not early.ok and early.reason == "too-early" and "--force" in early.message
    retired = await command(mesh, "retire", force=True)
    assert retired.ok and retired.roots == [new_fp]
    with trio.fail_after(10):
        for agent in (checkout, inventory):
            while len(agent.bundle) != 1:
                await trio.sleep(0.05)

    # The old root's leaf is now refused, by verification and by a real handshake.
    try:
        pki.verify_svid(old_svid.issued.chain, inventory.bundle)
    except pki.UnknownIssuer:
        pass
    else:
        raise AssertionError("a leaf of the retired root still verifies")
    refused = await mtls_exchange(
        inventory.server_context(),
        pki.client_context(old_svid, overlap),
        TD,
        expect_server=inventory.identity,
    )
    assert isinstance(refused, BaseException)
    assert isinstance(pki.classify_tls_failure(refused), pki.UnknownIssuer)
    seen = await mtls_exchange(
        inventory.server_context(),
        checkout.client_context(),
        TD,
        expect_server=inventory.identity,
    )
    assert seen == checkout.identity
    # Renewals keep working after the retirement.
    reviews = await mesh.agent("shop", "reviews")
    assert reviews.identity == SpiffeId(TD, "shop", "reviews")
    assert reviews.svid.issued.certificate.issuer == new_root.subject
