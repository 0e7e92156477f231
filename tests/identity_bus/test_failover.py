"""Two control-plane replicas as processes: kill the CA leader, the standby signs with the
same root. Plus the CLI (`mesh token create`, `mesh ca status`, `mesh certs`) as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from identity_bus_helpers import SECRET

from bus import subjects
from bus.client import Bus, connect
from bus.errors import BusTimeout, NoResponders
from bus.server import NatsCluster, NatsServer
from mesh import pki
from mesh.cli.token_cmd import create_token
from mesh.messages import CaCommand, CaCommandReply
from mesh.processes import child_kwargs, terminate
from mesh.spiffe import SpiffeId
from sidecar.identity import IdentityAgent

MESH = [sys.executable, "-m", "mesh"]
TD = "failover.mesh"


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return {**base, **extra}


async def mesh_cli(*args: str, **extra: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*MESH, *args], capture_stdout=True, capture_stderr=True, check=False, env=env(**extra)
        )


@asynccontextmanager
async def controlplane(url: str, replica: str, **extra: str) -> AsyncIterator[trio.Process]:
    proc = await trio.lowlevel.open_process(
        [*MESH, "controlplane", "--nats", url, "--replica", replica, "--ready-line"],
        stdout=subprocess.PIPE,
        **child_kwargs(env(MESH_CA_SECRET=SECRET.decode(), MESH_TRUST_DOMAIN=TD, **extra)),
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(20):
            while b'"ready"' not in buf:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"{replica} exited before ready: {buf!r}"
                buf += chunk
        yield proc
    finally:
        await terminate(proc)


async def ca_status(bus: Bus) -> CaCommandReply:
    """Ask until a leader answers (after a failover there is a gap of about the lease ttl)."""
    with trio.fail_after(15):
        while True:
            try:
                return await bus.request(
                    subjects.CA_COMMAND, CaCommand("status"), CaCommandReply, timeout=1
                )
            except (NoResponders, BusTimeout):
                await trio.sleep(0.1)


async def test_killed_ca_leader_standby_signs_with_the_same_root(nats_server: NatsServer) -> None:
    url = nats_server.url
    async with (
        controlplane(url, "cp-1") as cp1,
        controlplane(url, "cp-2") as cp2,
        connect(url) as bus,
        trio.open_nursery() as nursery,
    ):
        before = await ca_status(bus)
        assert before.trust_domain == TD and before.leader in ("cp-1", "cp-2")

        # The CLI as a user runs it: the token is printed once, on stdout, alone.
        made = await mesh_cli("token", "create", "-n", "shop", "-s", "checkout", "--nats", url)
        assert made.returncode == 0, made.stderr
        token = made.stdout.decode().strip()
        assert token.startswith("tmj1.") and "\n" not in token
        assert "shown only this once" in made.stderr.decode()
        first = IdentityAgent(SpiffeId(TD, "shop", "checkout"), token=token, name="checkout-1")
        await nursery.start(first.run, bus)
        with trio.fail_after(10):
            await first.wait_ready()

        certs = await mesh_cli("certs", "--json", "--wait", "0.5", "--nats", url)
        rows = [json.loads(line) for line in certs.stdout.decode().splitlines()]
        assert [r["serial"] for r in rows if r["agent"] == "checkout-1"] == [
            first.svid.issued.serial_hex
        ]
        status = await mesh_cli("ca", "status", "--json", "--nats", url)
        assert json.loads(status.stdout)["signing_root"] == before.signing_root

        # Kill the leader: no release, the standby waits out the lease and unseals the key.
        leader = cp1 if before.leader == "cp-1" else cp2
        leader.kill()
        await leader.wait()
        second = IdentityAgent(
            SpiffeId(TD, "shop", "inventory"),
            token=(
                await mesh_cli("token", "create", "-n", "shop", "-s", "inventory", "--nats", url)
            )
            .stdout.decode()
            .strip(),
            name="inventory-1",
            request_timeout=1.0,
        )
        await nursery.start(second.run, bus)
        with trio.fail_after(20):
            await second.wait_ready()
        after = await ca_status(bus)
        assert after.leader != before.leader
        assert after.signing_root == before.signing_root and after.roots == before.roots
        # Same root: each side's certificate verifies with the other's bundle.
        pki.verify_svid(second.svid.issued.chain, first.bundle, expected=second.identity)
        pki.verify_svid(first.svid.issued.chain, second.bundle, expected=first.identity)
        nursery.cancel_scope.cancel()


async def test_controlplane_without_operator_secret_refuses_with_a_clear_error(
    nats_server: NatsServer,
) -> None:
    result = await mesh_cli("controlplane", "--nats", nats_server.url)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "MESH_CA_SECRET or MESH_CA_SECRET_FILE" in err and "Traceback" not in err


async def test_cli_errors_are_one_line(nats_server: NatsServer) -> None:
    result = await mesh_cli("ca", "rotate", "--nats", nats_server.url, "--timeout", "0.5")
    err = result.stderr.decode()
    assert result.returncode == 1 and "no CA leader answered" in err and "Traceback" not in err
    result = await mesh_cli(
        "token", "create", "-n", "shop", "-s", "checkout", "--nats", nats_server.url
    )
    err = result.stderr.decode()
    assert result.returncode == 1 and "no CA leader answered for the trust bundle" in err
    result = await mesh_cli(
        "token",
        "create",
        "-n",
        "shop",
        "-s",
        "a b",
        "--trust-domain",
        "x.y",
        "--ttl",
        "1w",
        "--nats",
        nats_server.url,
    )
    err = result.stderr.decode()
    assert result.returncode == 1 and "'1w' is not a duration" in err and "Traceback" not in err


async def test_token_list_and_revoke(nats_server: NatsServer) -> None:
    url = nats_server.url
    made = await mesh_cli(
        "token",
        "create",
        "-n",
        "shop",
        "-s",
        "cart",
        "--trust-domain",
        TD,
        "--uses",
        "2",
        "--nats",
        url,
    )
    assert made.returncode == 0, made.stderr
    token_id = made.stdout.decode().split(".")[1]
    listed = (await mesh_cli("token", "list", "--nats", url)).stdout.decode()
    assert token_id in listed and f"spiffe://{TD}/ns/shop/sa/cart" in listed
    assert "0/2" in listed and "valid" in listed
    assert made.stdout.decode().split(".")[2].strip() not in listed  # never the secret
    revoked = await mesh_cli("token", "revoke", token_id, "--nats", url)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout.decode()
    assert "revoked" in (await mesh_cli("token", "list", "--nats", url)).stdout.decode()
    missing = await mesh_cli("token", "revoke", "0123456789abcdef", "--nats", url)
    assert missing.returncode == 1 and "no join token with id" in missing.stderr.decode()


async def test_failover_on_a_three_node_cluster_with_replicated_kv(
    nats_cluster: NatsCluster,
) -> None:
    """The same takeover with the CA, token and lease buckets replicated on 3 NATS nodes, each
    replica connected to a different node."""
    urls = nats_cluster.urls
    async with (
        controlplane(urls[0], "cp-1", MESH_KV_REPLICAS="3") as cp1,
        controlplane(urls[1], "cp-2", MESH_KV_REPLICAS="3") as cp2,
        connect(urls[2]) as bus,
        trio.open_nursery() as nursery,
    ):
        before = await ca_status(bus)
        leader = cp1 if before.leader == "cp-1" else cp2
        leader.kill()
        await leader.wait()
        ident = SpiffeId(TD, "shop", "checkout")
        token, _ = await create_token(bus, ident)
        agent = IdentityAgent(ident, token=token, request_timeout=1.0)
        await nursery.start(agent.run, bus)
        with trio.fail_after(20):
            await agent.wait_ready()
        after = await ca_status(bus)
        assert after.leader != before.leader and after.signing_root == before.signing_root
        assert agent.bundle.fingerprints() == before.roots
        nursery.cancel_scope.cancel()
