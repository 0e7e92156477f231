"""The certificate flow with the mesh's NATS roles on a real, locked-down nats-server: the CA
runs as controlplane, tokens are made as admin, the agent is a sidecar user and still gets
its certificate and follows a rotation; what a sidecar user may not do is refused."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from identity_bus_helpers import SECRET, TD

from actors.ca import CaActor
from actors.ca_config import CaConfig
from actors.runtime import ActorContext
from bus import subjects
from bus.auth import (
    Credentials,
    SidecarScope,
    authorization_config,
    ensure_credentials,
    mesh_users,
)
from bus.client import connect
from bus.errors import BusPermissionError
from bus.kv import open_kv
from bus.server import NatsServer, NodeSpec
from mesh.cli.token_cmd import create_token, trust_domain_of_running_ca
from mesh.messages import CaCommand, CaCommandReply, CsrReply, CsrRequest
from mesh.spiffe import SpiffeId
from sidecar.identity import IdentityAgent


@pytest.fixture
async def locked(tmp_path: Path) -> AsyncIterator[tuple[str, dict[str, str]]]:
    creds: dict[str, Credentials] = ensure_credentials(
        tmp_path, mesh_users([SidecarScope("checkout", "a"), SidecarScope("reviews", "b")])
    )
    spec = NodeSpec("locked", tmp_path / "nats", authorization=authorization_config(creds.values()))
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(spec).run)
        yield server.url, {u: str(c.path) for u, c in creds.items()}
        nursery.cancel_scope.cancel()


REPLY_TRICK = r"""
import asyncio, sys, nats
async def main():
    url, user, password = sys.argv[1:]
    errors = []
    async def on_error(e):
        errors.append(e)
    nc = await nats.connect(url, user=user, password=password, error_cb=on_error)
    for subject in ("$JS.API.DIRECT.GET.KV_mesh_ca.$KV.mesh_ca.bundle",
                    "$JS.API.STREAM.INFO.KV_mesh_ca"):
        await nc.publish(subject, b"", reply="$KV.mesh_ca.ca")
    await nc.flush()
    await asyncio.sleep(0.3)
    print("published", len(errors), flush=True)
    await nc.close()
asyncio.run(main())
"""


async def test_sidecar_user_gets_a_certificate_and_follows_a_rotation(
    locked: tuple[str, dict[str, str]],
) -> None:
    url, files = locked
    config = CaConfig(secret=SECRET, trust_domain=TD, lease_ttl=1.0)
    ident = SpiffeId(TD, "shop", "checkout")
    async with (
        connect(url, creds_file=files["controlplane"]) as cp,
        connect(url, creds_file=files["admin"]) as admin,
        connect(url, creds_file=files["sidecar-a"]) as sidecar,
        connect(url, creds_file=files["sidecar-b"]) as other,
        trio.open_nursery() as nursery,
    ):
        ca = CaActor(config)
        await nursery.start(ca.run, ActorContext(bus=cp, replica="cp-1"))
        with trio.fail_after(10):
            await ca.leading.wait()
        token, _ = await create_token(admin, ident)

        # Another sidecar can neither read join tokens in flight nor the replies.
        for subject in (subjects.CA_SIGN, "_INBOX.sidecar-a.>", "_INBOX.>"):
            with pytest.raises(BusPermissionError):
                async with other.subscribe_raw(subject):
                    pass
        # A sidecar cannot rotate the CA, nor announce a bundle.
        with pytest.raises(BusPermissionError, match=r"mesh\.ca\.command"):
            await sidecar.request(
                subjects.CA_COMMAND, CaCommand("rotate"), CaCommandReply, timeout=1
            )
        sidecar.publish_nowait(subjects.CA_BUNDLE, b"forged")
        await sidecar.flush()
        assert sidecar.was_denied("publish", subjects.CA_BUNDLE)

        # No JetStream at all, even read-only: JetStream answers on whatever reply subject
        # the request names, with its own rights, so a KV get whose reply subject is
        # $KV.mesh_ca.ca used to overwrite the sealed CA. Tried with a plain nats-py client.
        kv = await open_kv(cp, subjects.KV_CA, direct=True)
        sealed = await kv.get("ca")
        assert sealed is not None
        user = json.loads(await trio.Path(files["sidecar-a"]).read_text())
        trick = await trio.run_process(
            [sys.executable, "-c", REPLY_TRICK, url, user["user"], user["password"]],
            capture_stdout=True, check=False)
        assert b"published" in trick.stdout
        after = await kv.get("ca")
        assert after is not None and after.value == sealed.value
        assert (await kv.get("bundle")) is not None

        # Its job: the trust domain (asked of the CA leader), a certificate, bundle updates.
        assert await trust_domain_of_running_ca(sidecar) == TD
        agent = IdentityAgent(ident, token=token, rekey_spread=0.2)
        await nursery.start(agent.run, sidecar)
        with trio.fail_after(10):
            await agent.wait_ready()
        rotated = await admin.request(
            subjects.CA_COMMAND, CaCommand("rotate"), CaCommandReply, timeout=5
        )
        assert rotated.ok, rotated.message
        with trio.fail_after(10):
            while len(agent.bundle) != 2 or agent.renewals < 1:
                await trio.sleep(0.05)
        assert agent.rejected_bundles == 0
        # A renewal request from the wrong sidecar user is answered only to that user.
        reply = await other.request(
            subjects.CA_SIGN, CsrRequest(ident.uri, b"junk"), CsrReply, timeout=5
        )
        assert not reply.ok
        nursery.cancel_scope.cancel()


async def test_a_sidecar_cannot_aim_a_control_plane_answer_at_a_kv_key(
    locked: tuple[str, dict[str, str]],
) -> None:
    """NATS does not check a request's reply subject: a sidecar user once had the CA leader
    publish its refusal onto `$KV.mesh_ca.ca`, destroying the sealed CA key. Answers now go
    to inboxes only."""
    import nats
    import trio_asyncio

    from bus.auth import load_credentials
    from bus.kv import open_kv
    from mesh import pki
    from mesh.messages import encode

    url, files = locked
    async with (
        connect(url, creds_file=files["controlplane"]) as cp,
        trio.open_nursery() as nursery,
    ):
        ca = CaActor(CaConfig(secret=SECRET, trust_domain=TD, lease_ttl=1.0))
        await nursery.start(ca.run, ActorContext(bus=cp, replica="cp-1"))
        with trio.fail_after(10):
            await ca.leading.wait()
        kv = await open_kv(cp, subjects.KV_CA, direct=True)
        before = await kv.get("ca")
        assert before is not None

        # A raw NATS client with sidecar credentials, choosing the reply subject.
        creds = load_credentials(Path(files["sidecar-a"]))
        junk = encode(CsrRequest(identity=f"spiffe://{TD}/ns/x/sa/y", csr=b"junk", token="x"))
        async with trio_asyncio.open_loop():
            nc = await trio_asyncio.aio_as_trio(nats.connect)(
                url, user=creds.user, password=creds.password, inbox_prefix=creds.inbox_prefix)
            try:
                for target in (f"$KV.{subjects.KV_CA}.ca", f"$KV.{subjects.KV_CA}.bundle",
                               "mesh.config.push.payments"):
                    await trio_asyncio.aio_as_trio(nc.publish)(subjects.CA_SIGN, junk,
                                                               reply=target)
                await trio_asyncio.aio_as_trio(nc.flush)()
                # A real request from the same client is still answered (a refusal here).
                answer = await trio_asyncio.aio_as_trio(nc.request)(subjects.CA_SIGN, junk,
                                                                    timeout=5)
                assert b"csr" in answer.data
            finally:
                await trio_asyncio.aio_as_trio(nc.close)()
        with trio.fail_after(10):
            while cp.stats.replies_refused < 3:
                await trio.sleep(0.05)
        after = await kv.get("ca")
        assert after is not None and after.revision == before.revision
        assert pki.unseal_ca(after.value, SECRET).trust_domain == TD
        nursery.cancel_scope.cancel()
