"""NATS authorization with the mesh's roles, against a real nats-server."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from bus import subjects
from bus.auth import (
    Credentials,
    CredentialsError,
    authorization_config,
    ensure_credentials,
    load_credentials,
)
from bus.client import connect
from bus.errors import BusConnectError, BusPermissionError, KVError
from bus.kv import INITIAL_DONE, KVEntry, open_kv
from bus.server import NatsServer, NodeSpec
from mesh.messages import Ping, Pong

USERS = [("controlplane", "controlplane"), ("admin", "admin"), ("sidecar", "sidecar"),
         ("sidecar-b", "sidecar")]  # fmt: skip


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, dict[str, Credentials]]]:
    creds = ensure_credentials(tmp_path / "state", USERS)
    spec = NodeSpec("auth", tmp_path / "nats", authorization=authorization_config(creds.values()))
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(spec).run)
        yield server, creds
        nursery.cancel_scope.cancel()


def path(creds: dict[str, Credentials], user: str) -> str:
    p = creds[user].path
    assert p is not None
    return str(p)


def test_credential_files_are_private_and_stable(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path, USERS)
    again = ensure_credentials(tmp_path, USERS)
    for user, creds in first.items():
        assert creds.password == again[user].password  # generated once, then reused
        assert creds.path is not None
        assert stat.S_IMODE(os.stat(creds.path).st_mode) == 0o600
        assert creds.password not in repr(creds)
    assert len({c.password for c in first.values()}) == len(USERS)
    assert stat.S_IMODE(os.stat(tmp_path / "nats-creds").st_mode) == 0o700


def test_bad_credential_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="does not exist"):
        load_credentials(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("user=x password=hunter2")
    with pytest.raises(CredentialsError, match=r"bad\.json is not a mesh credentials file") as info:
        load_credentials(bad)
    assert "hunter2" not in str(info.value)


async def test_anonymous_and_wrong_password_are_refused_clearly(
    secured: tuple[NatsServer, dict[str, Credentials]], tmp_path: Path
) -> None:
    server, _ = secured
    with pytest.raises(BusConnectError, match="requires credentials: pass --creds"):
        async with connect(server.url, connect_timeout=3.0):
            pass
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"user": "admin", "password": "not-the-password"}')
    with pytest.raises(BusConnectError, match=r"refused user 'admin'.*wrong or outdated") as info:
        async with connect(server.url, creds_file=str(wrong), connect_timeout=3.0):
            pass
    assert "not-the-password" not in str(info.value)


async def test_admin_and_controlplane_use_kv(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    server, creds = secured
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        kv = await open_kv(admin, subjects.KV_CONFIG, history=5)
        rev = await kv.put(subjects.CONFIG_KEY, b"v1")
        await kv.update(subjects.CONFIG_KEY, b"v2", rev)
        assert [e.value for e in await kv.history(subjects.CONFIG_KEY)] == [b"v1", b"v2"]
    async with connect(server.url, creds_file=path(creds, "controlplane")) as cp:
        kv = await open_kv(cp, subjects.KV_CONFIG)
        entry = await kv.get(subjects.CONFIG_KEY)
        assert entry is not None and entry.value == b"v2"
        async with kv.watch() as watch:
            seen = [await watch.__anext__(), await watch.__anext__()]
        assert isinstance(seen[0], KVEntry) and seen[1] is INITIAL_DONE
        await kv.create("other", b"x")


async def test_sidecar_cannot_touch_kv_ca_commands_or_sign_subject(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    server, creds = secured
    async with connect(server.url, creds_file=path(creds, "sidecar"), connect_timeout=3.0) as sc:
        with pytest.raises((KVError, BusPermissionError), match=r"not allowed|Permissions"):
            kv = await open_kv(sc, subjects.KV_CONFIG, create=True)
            await kv.put(subjects.CONFIG_KEY, b"evil")
        with pytest.raises(BusPermissionError, match=r"publish to mesh\.ca\.command"):
            await sc.request_raw(subjects.CA_COMMAND, b"rotate", timeout=1.0)
        for subject in (subjects.CA_SIGN, subjects.CA_COMMAND, "_INBOX.>", "_INBOX.sidecar-b.>",
                        "mesh.config.full", ">"):  # fmt: skip
            with pytest.raises(BusPermissionError, match="not allowed to subscribe"):
                async with sc.subscribe_raw(subject):
                    pass
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        kv = await open_kv(admin, subjects.KV_CONFIG)
        assert await kv.get(subjects.CONFIG_KEY) is None  # nothing was written


async def test_sidecar_does_its_job_and_gets_only_its_own_replies(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    server, creds = secured
    async with (
        connect(server.url, creds_file=path(creds, "controlplane")) as cp,
        connect(server.url, creds_file=path(creds, "sidecar")) as sc,
        connect(server.url, creds_file=path(creds, "sidecar-b")) as other,
        cp.subscribe(subjects.CONFIG_FULL_ALL) as full,
        cp.subscribe_raw(subjects.TELEMETRY_ALL) as telemetry,
        sc.subscribe_raw(subjects.config_push("checkout")) as push,
        sc.subscribe_raw(subjects.CA_BUNDLE) as bundle,
        trio.open_nursery() as nursery,
    ):
        # The other sidecar may listen under its own inbox only, never under ours.
        with pytest.raises(BusPermissionError):
            async with other.subscribe_raw("_INBOX.sidecar.>"):
                pass

        async def respond() -> None:
            async for d in full:
                assert d.reply.startswith("_INBOX.sidecar.")
                cp.reply(
                    d, Pong(replica="cp", version="test", uptime_s=0.0)
                )  # allowed through allow_responses only

        nursery.start_soon(respond)
        reply = await sc.request(subjects.config_full("checkout", "c-1"), Ping(), Pong)
        assert reply.replica == "cp"
        sc.publish_nowait(subjects.telemetry("shop", "checkout", "c-1"), b"batch")
        await cp.publish(subjects.config_push("checkout"), b"delta")
        await cp.publish(subjects.CA_BUNDLE, b"bundle")
        with trio.fail_after(5):
            assert (await telemetry.__anext__()).body == b"batch"
            assert (await push.__anext__()).body == b"delta"
            assert (await bundle.__anext__()).body == b"bundle"
        # The control plane may not write into inboxes except as a response.
        cp.publish_nowait("_INBOX.sidecar.forged", b"x")
        await cp.flush()
        assert cp.was_denied("publish", "_INBOX.sidecar.forged")
        nursery.cancel_scope.cancel()


async def test_admin_cannot_announce_bundles_or_read_join_tokens(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    server, creds = secured
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        with pytest.raises(BusPermissionError):
            async with admin.subscribe_raw(subjects.CA_SIGN):
                pass
        with pytest.raises(BusPermissionError):
            await admin.request_raw(subjects.CA_BUNDLE, b"x", timeout=1.0)


async def test_sidecar_has_no_jetstream_right_at_all(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    """Not even a read: JetStream answers on the reply subject a request names, with its
    own rights (tests/identity_bus/test_ca_auth.py shows the overwrite that allowed)."""
    server, creds = secured
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        kv = await open_kv(admin, subjects.KV_CA, direct=True)
        await kv.put("bundle", b"public roots")
        await kv.put("ca", b"sealed key")
    async with connect(server.url, creds_file=path(creds, "sidecar")) as sc:
        with pytest.raises(BusPermissionError, match="not allowed"):
            await open_kv(sc, subjects.KV_CA, create=False)
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        kv = await open_kv(admin, subjects.KV_CA)
        for key, value in (("bundle", b"public roots"), ("ca", b"sealed key")):
            entry = await kv.get(key)
            assert entry is not None and entry.value == value


async def test_write_auth_for_real_hosts_is_included_by_nats_conf(tmp_path: Path) -> None:
    import sys

    # nats-server resolves `include` relative to the including file: the file goes next to
    # nats.conf, as in /etc/trio-mesh on a real host.
    folder = tmp_path / "nats"
    with trio.fail_after(30):
        done = await trio.run_process(
            [sys.executable, "-m", "mesh", "nats", "--write-auth", str(folder),
             "--sidecar", "reviews/reviews-v2"],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    assert b"nats-auth.conf" in done.stdout
    assert b"sidecar-reviews-v2.json: may speak for service reviews instance reviews-v2" in (
        done.stdout
    )
    for p in (folder / "nats-auth.conf", *(folder / "nats-creds").iterdir()):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        secret = load_credentials(p).password if p.suffix == ".json" else ""
        assert not secret or secret.encode() not in done.stdout + done.stderr
    # The operator's nats.conf includes the file; the role files work against it.
    spec = NodeSpec("host-a", tmp_path / "nats", authorization="include nats-auth.conf")
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(spec).run)
        sidecar_file = str(folder / "nats-creds" / "sidecar-reviews-v2.json")
        async with connect(server.url, creds_file=sidecar_file) as sc:
            assert sc.credentials is not None and sc.credentials.inbox_prefix == (
                "_INBOX.sidecar-reviews-v2"
            )
        with pytest.raises(BusConnectError, match="requires credentials"):
            async with connect(server.url, connect_timeout=3.0):
                pass
        nursery.cancel_scope.cancel()


async def test_a_ca_bucket_from_before_is_switched_to_direct_gets(
    secured: tuple[NatsServer, dict[str, Credentials]],
) -> None:
    server, creds = secured
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        old = await open_kv(admin, subjects.KV_CA)  # as an older version made it
        await old.put("bundle", b"public roots")
        await open_kv(admin, subjects.KV_CA, direct=True)  # what the CA actor does now
    async with connect(server.url, creds_file=path(creds, "admin")) as admin:
        entry = await (await open_kv(admin, subjects.KV_CA, direct=True)).get("bundle")
        assert entry is not None and entry.value == b"public roots"
