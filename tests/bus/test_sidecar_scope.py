"""Per-sidecar NATS users speak only for their own service, against a real nats-server with the
authorization config `mesh up` writes (bus/auth.py), real nats-py clients through
bus.client.connect, and the real config actor and telemetry aggregator."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
import trio

from actors.config import ConfigActor
from actors.controlplane import run_replica
from actors.telemetry import TelemetryActor
from bus import subjects
from bus.auth import (
    CREDS_ENV,
    CredentialsError,
    SidecarScope,
    authorization_config,
    ensure_credentials,
    mesh_users,
    permissions_for,
)
from bus.client import Bus, connect
from bus.errors import BusPermissionError
from bus.server import NatsServer, NodeSpec
from bus.subscription import Delivery
from mesh.errors import ConfigError
from mesh.messages import (
    ConfigStatus,
    ConfigStatusRequest,
    Ping,
    Pong,
    SnapshotPush,
    TelemetryBatch,
)
from mesh.sync import ClientSync, ServerSync
from mesh.telemetry import build_batch
from sidecar.telemetry import Recorder

# Two services' sidecars, as `mesh up --demo` makes them (instance pinned), plus one user
# bound to a service only (`mesh nats --write-auth --sidecar ratings`).
CATALOG = SidecarScope("catalog", "catalog-v1-1")
RATINGS = SidecarScope("ratings", "ratings-v1-1")
ANY_RATINGS = SidecarScope("ratings")


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, dict[str, str]]]:
    creds = ensure_credentials(tmp_path / "state", mesh_users([CATALOG, RATINGS, ANY_RATINGS]))
    spec = NodeSpec("scope", tmp_path / "nats", authorization=authorization_config(creds.values()))
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(spec).run)
        yield server, {u: str(c.path) for u, c in creds.items()}
        nursery.cancel_scope.cancel()


def test_users_are_named_and_scoped_as_documented(tmp_path: Path) -> None:
    users = mesh_users([CATALOG, ANY_RATINGS])
    assert [u[0] for u in users] == [
        "controlplane", "admin", "sidecar", "sidecar-catalog-v1-1", "sidecar-ratings",
    ]  # fmt: skip
    p = permissions_for("sidecar", "sidecar-catalog-v1-1", CATALOG)
    assert "mesh.telemetry.*.catalog.catalog-v1-1" in p.publish
    assert "mesh.config.heartbeat.catalog.catalog-v1-1" in p.publish
    assert "mesh.spans.catalog" in p.publish and "mesh.accesslog.catalog" in p.publish
    assert not any(s.endswith(">") for s in p.publish)  # nothing open-ended
    assert "mesh.config.push.catalog" in p.subscribe
    assert subjects.CONFIG_PUSH_ALL not in p.subscribe
    # The scope is stated by the config writer, not taken from the (holder's) file.
    made = ensure_credentials(tmp_path, mesh_users([CATALOG]))
    assert made["sidecar-catalog-v1-1"].scope == CATALOG
    assert "scope" not in Path(str(made["sidecar-catalog-v1-1"].path)).read_text()
    with pytest.raises(CredentialsError, match="share NATS user"):
        mesh_users([SidecarScope("catalog", "x"), SidecarScope("ratings", "x")])
    with pytest.raises(CredentialsError, match="only sidecar users"):
        permissions_for("admin", "admin", CATALOG)
    for bad in ("*", ">", "a.b"):
        with pytest.raises(ConfigError, match="cannot be used in a NATS subject"):
            SidecarScope(bad)


async def _nothing_but(watch: object, marker: bytes) -> list[Delivery[bytes]]:
    """Everything the full-rights watcher got up to and including `marker`."""
    got: list[Delivery[bytes]] = []
    with trio.fail_after(5):
        async for d in watch:  # type: ignore[attr-defined]
            got.append(d)
            if d.body == marker:
                return got
    raise AssertionError("unreachable")


async def test_sidecar_of_a_service_does_its_whole_job(
    secured: tuple[NatsServer, dict[str, str]],
) -> None:
    server, files = secured
    svc, inst = CATALOG.service, CATALOG.instance
    async with (
        connect(server.url, creds_file=files["controlplane"]) as cp,
        connect(server.url, creds_file=files["controlplane"]) as watcher,
        connect(server.url, creds_file=files["sidecar-catalog-v1-1"]) as sc,
        watcher.subscribe_raw(f"{subjects.PREFIX}.>") as watch,
        cp.subscribe(subjects.CONFIG_FULL_ALL, queue=subjects.CONFIG_QUEUE) as full,
        cp.subscribe(subjects.CA_SIGN, queue=subjects.CA_QUEUE) as sign,
        sc.subscribe_raw(subjects.config_push(svc)) as push,
        sc.subscribe_raw(subjects.CA_BUNDLE) as bundle,
        trio.open_nursery() as nursery,
    ):

        async def respond(mailbox: object) -> None:
            async for d in mailbox:  # type: ignore[attr-defined]
                cp.reply(d, Pong(replica="cp", version="test", uptime_s=0.0))

        nursery.start_soon(respond, full)
        nursery.start_soon(respond, sign)
        # A full snapshot and a certificate: requests answered into its own inbox.
        assert (await sc.request(subjects.config_full(svc, inst), Ping(), Pong)).replica == "cp"
        assert (await sc.request(subjects.CA_SIGN, Ping(), Pong)).replica == "cp"
        mine = [
            subjects.telemetry("default", svc, inst),
            subjects.telemetry("demo", svc, inst),  # the namespace label is not pinned
            subjects.spans(svc),
            subjects.accesslog(svc),
            subjects.config_heartbeat(svc, inst),
            subjects.config_ack(svc, inst),
        ]
        for subject in mine:
            sc.publish_nowait(subject, subject.encode())
        sc.publish_nowait(subjects.config_ack(svc, inst), b"end")
        await sc.flush()
        got = {d.subject for d in await _nothing_but(watch, b"end")}
        assert set(mine) <= got
        assert sc.denied_count == 0
        # Config pushes for its service and bundle announcements reach it.
        await cp.publish(subjects.config_push(svc), b"delta")
        await cp.publish(subjects.CA_BUNDLE, b"bundle")
        with trio.fail_after(5):
            assert (await push.__anext__()).body == b"delta"
            assert (await bundle.__anext__()).body == b"bundle"
        nursery.cancel_scope.cancel()


async def test_sidecar_cannot_speak_for_or_listen_to_another_service(
    secured: tuple[NatsServer, dict[str, str]],
) -> None:
    server, files = secured
    inst = RATINGS.instance
    async with (
        connect(server.url, creds_file=files["controlplane"]) as cp,
        connect(server.url, creds_file=files["sidecar-catalog-v1-1"]) as sc,
        cp.subscribe_raw(f"{subjects.PREFIX}.>") as watch,
    ):
        forged = [
            subjects.telemetry("default", "ratings", inst),
            subjects.spans("ratings"),
            subjects.accesslog("ratings"),
            subjects.config_heartbeat("ratings", inst),  # e.g. a `leaving` one
            subjects.config_ack("ratings", inst),
            subjects.config_full("ratings", inst),
            # Its own service, another instance: the demo's users are bound to one instance.
            subjects.config_heartbeat("catalog", "catalog-v2-1"),
            subjects.telemetry("default", "catalog", "catalog-v2-1"),
        ]
        for subject in forged:
            since = sc.denied_count
            sc.publish_nowait(subject, b"forged")
            await sc.flush()
            with trio.fail_after(5):  # the server's refusal arrives asynchronously
                while not sc.was_denied("publish", subject, since=since):
                    await trio.sleep(0.01)
        for subject in (subjects.config_push("ratings"), subjects.CONFIG_PUSH_ALL,
                        f"{subjects.PREFIX}.telemetry.>", "_INBOX.sidecar-ratings-v1-1.>"):  # fmt: skip
            with pytest.raises(BusPermissionError, match="not allowed to subscribe"):
                async with sc.subscribe_raw(subject):
                    pass
        # A subscriber with every right saw none of it: the next thing it gets is the marker.
        await cp.publish(subjects.config_ack("x", "y"), b"end")
        got = await _nothing_but(watch, b"end")
        assert [d.body for d in got] == [b"end"], [d.subject for d in got]


async def test_a_service_wide_user_covers_any_instance_of_its_service_only(
    secured: tuple[NatsServer, dict[str, str]],
) -> None:
    server, files = secured
    async with (
        connect(server.url, creds_file=files["controlplane"]) as cp,
        connect(server.url, creds_file=files["sidecar-ratings"]) as sc,
        cp.subscribe_raw(f"{subjects.PREFIX}.>") as watch,
    ):
        sc.publish_nowait(subjects.config_heartbeat("ratings", "ratings-host-7-123"), b"ok")
        sc.publish_nowait(subjects.config_heartbeat("catalog", "ratings-host-7-123"), b"bad")
        await sc.flush()
        with trio.fail_after(5):
            while not sc.was_denied("publish", subjects.config_heartbeat("catalog", "r")[:-1]):
                await trio.sleep(0.01)
        await cp.publish(subjects.config_ack("x", "y"), b"end")
        assert [d.body for d in await _nothing_but(watch, b"end")] == [b"ok", b"end"]


def batch(svc: str, inst: str, src: str, dst: str, epoch: str = "e1") -> TelemetryBatch:
    """A one-request batch whose body says it comes from sidecar `inst` of `svc`."""
    rec = Recorder("default", svc, inst)
    rec.record(src, dst, "v1", 500, "", 0.01)
    return build_batch(namespace="default", service=svc, instance=inst, epoch=epoch, seq=1,
                       ts=time.time(), interval=1.0, pairs=rec.take())  # fmt: skip


async def _status(bus: Bus) -> ConfigStatus:
    return await bus.request(subjects.CONFIG_STATUS, ConfigStatusRequest(), ConfigStatus)


async def test_control_plane_drops_bodies_that_name_another_sidecar(
    secured: tuple[NatsServer, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On its own subjects a sidecar can still write anything in the body: the config actor
    and the telemetry aggregator hold the body to the subject."""
    server, files = secured
    monkeypatch.setenv(CREDS_ENV, files["controlplane"])  # the replica's user
    config = ConfigActor(warmup=0.1, debounce=0.05, max_delay=0.2)
    telemetry = TelemetryActor(metrics_port=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_replica, [server.url], "cp-t", actors=[config, telemetry])
        )
        async with (
            connect(server.url, creds_file=files["admin"]) as admin,
            connect(server.url, creds_file=files["sidecar-catalog-v1-1"]) as catalog,
            connect(server.url, creds_file=files["sidecar-ratings-v1-1"]) as ratings,
        ):
            real = ClientSync(instance=RATINGS.instance, service="ratings", label="v1",
                              address="127.0.0.1:1")  # fmt: skip
            first = await ratings.request(
                subjects.config_full("ratings", RATINGS.instance), real.hello(), SnapshotPush
            )
            assert first.service == "ratings"
            ratings.publish_nowait(
                subjects.config_heartbeat("ratings", RATINGS.instance), real.heartbeat(1.0)
            )
            # catalog's sidecar, on its own heartbeat subject, says ratings' instance leaves.
            fake = ClientSync(instance=RATINGS.instance, service="ratings", label="v1")
            subject = subjects.config_heartbeat("catalog", CATALOG.instance)
            catalog.publish_nowait(subject, fake.heartbeat(1.0, leaving=True))
            await catalog.flush()
            with trio.fail_after(5):
                while (await _status(admin)).stats["impersonations"] < 1:
                    await trio.sleep(0.05)
            rows = (await _status(admin)).sidecars
            assert [(r["service"], r["instance"]) for r in rows] == [
                ("ratings", RATINGS.instance)
            ]

            # Telemetry: a batch naming ratings on catalog's subject, and one on its own
            # subject reporting an edge catalog is no party to, are both refused.
            on_own_subject = subjects.telemetry("default", "catalog", CATALOG.instance)
            for body in (
                batch("ratings", RATINGS.instance, "ratings", "stock"),  # names ratings
                batch("catalog", CATALOG.instance, "frontend", "ratings"),  # not its edge
                batch("catalog", CATALOG.instance, "catalog", "ratings", epoch="e2"),  # honest
            ):
                catalog.publish_nowait(on_own_subject, body)
            await catalog.flush()
            with trio.fail_after(5):
                while telemetry.state.stats.batches < 1:
                    await trio.sleep(0.05)
            assert telemetry.state.stats.bad == 2
            assert set(telemetry.state.totals) == {("catalog", "ratings")}
        nursery.cancel_scope.cancel()


def test_an_instance_name_is_not_taken_over_by_another_service() -> None:
    """A user bound to a service but not to an instance (`--sidecar ratings`) may name any
    instance on its own subjects: the books keep a live instance with the service that
    registered it (pure: mesh/sync.py)."""
    server = ServerSync()
    owner = ClientSync(instance="shared-1", service="catalog", label="v1", address="10.0.0.1:1")
    intruder = ClientSync(instance="shared-1", service="ratings", label="v1", address="10.0.0.9:9")
    assert server.on_heartbeat(owner.heartbeat(1.0), now=0.0)[0]
    assert server.on_heartbeat(intruder.heartbeat(1.0), now=0.1) == (False, None)
    assert not server.on_request(intruder.hello(), now=0.2)
    assert server.on_heartbeat(intruder.heartbeat(1.0, leaving=True), now=0.3) == (False, None)
    assert [(r.service, r.address) for r in server.registrations()] == [("catalog", "10.0.0.1:1")]
    assert server.name_conflicts >= 2  # counted (and logged, throttled): squatting is visible
    # Once the owner is gone (left or expired), the name is free again.
    assert server.on_heartbeat(owner.heartbeat(1.0, leaving=True), now=0.4)[0]
    assert server.on_heartbeat(intruder.heartbeat(1.0), now=0.5)[0]


@pytest.mark.parametrize("name", ["a\n", "a.b", "a*", ">", "", "a b", "x" * 129])
def test_a_name_that_is_not_one_plain_subject_token_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="NATS subject"):
        subjects.token(name)
    from mesh.messages import SnapshotRequest

    assert not ServerSync.acceptable(SnapshotRequest(service=name, instance="i-1", label="v1"))
