"""Three hosts (network namespaces on a bridge): a NATS node on each, a CA, sidecars calling
across hosts over mTLS, and the loss of one host leaving the other two serving."""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.ca import CaActor
from actors.ca_config import CaConfig
from actors.runtime import ActorContext
from bus.auth import (
    SidecarScope,
    authorization_config,
    ensure_credentials,
    load_credentials,
    mesh_users,
)
from bus.client import Bus, connect
from bus.errors import BusConnectError
from bus.server import NatsCluster
from deploy import netns
from deploy.supervisor import ChildProcess
from mesh.cli.token_cmd import create_token
from mesh.messages import Blob
from mesh.spiffe import SpiffeId

pytestmark = pytest.mark.slow

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "sidecar" / "app_server.py")
TD = "multihost.mesh"
NS = "shop"
SECRET = b"multihost operator secret, 32 b."

# Run on a host: `count` plaintext HTTP/1.1 requests to addr:port (args: addr port count
# [header lines...]), each on its own connection; prints {"status": int, "body": str} per
# request: status 0 when the connection was accepted and then closed without an HTTP answer
# (what a STRICT inbound port does to plaintext), -1 when it could not connect at all.
PROBE = r"""
import json, socket, sys
addr, port, count, *extra = sys.argv[1:]
for _ in range(int(count)):
    raw, status = b"", 0
    try:
        s = socket.create_connection((addr, int(port)), timeout=10)
    except OSError:
        status = -1
    else:
        with s:
            try:
                head = ["GET /anything HTTP/1.1", "host: catalog", "connection: close", *extra]
                s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
                while data := s.recv(65536):
                    raw += data
            except OSError:
                pass
    head, _, body = raw.partition(b"\r\n\r\n")
    if raw:
        status = int(head.split()[1])
    print(json.dumps({"status": status, "body": body.decode("latin-1")}), flush=True)
"""


def ident(sa: str) -> str:
    return f"spiffe://{TD}/ns/{NS}/sa/{sa}"


@pytest.fixture
def three_hosts() -> Iterator[list[netns.Host]]:
    reason = netns.available()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    with netns.hosts(3) as hosts:
        yield hosts


@pytest.fixture
def creds(three_hosts: list[netns.Host], tmp_path: Path) -> dict[str, str]:
    """The mesh's NATS users, as an operator makes them for real hosts (`mesh nats
    --write-auth ... --sidecar SERVICE/NAME`): one sidecar user per host. File paths by user."""
    # h1 runs frontend's sidecar, h2 and h3 catalog's: each user speaks for its service only.
    scopes = [SidecarScope("frontend" if i == 0 else "catalog", h.name)
              for i, h in enumerate(three_hosts)]  # fmt: skip
    made = ensure_credentials(tmp_path / "etc", mesh_users(scopes))
    return {user: str(c.path) for user, c in made.items()}


@pytest.fixture
async def cluster(
    three_hosts: list[netns.Host], tmp_path: Path, creds: dict[str, str]
) -> AsyncIterator[NatsCluster]:
    """Locked down as on real hosts: client users with permissions, authenticated routes."""
    spec = [(h.ip, h.exec_prefix) for h in three_hosts]
    users = [load_credentials(p) for p in creds.values()]
    nodes = NatsCluster(
        0,
        tmp_path / "nats",
        hosts=spec,
        authorization=authorization_config(users),
        route_auth=("route", secrets.token_urlsafe(24)),
    )
    async with trio.open_nursery() as nursery:
        yield await nursery.start(nodes.run)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def ca_bus(cluster: NatsCluster, creds: dict[str, str]) -> AsyncIterator[Bus]:
    """A CA actor (in this process, on h1's NATS node) with its state replicated on all three
    nodes, so losing a host loses no CA state; yields its bus for creating join tokens."""
    config = CaConfig(secret=SECRET, trust_domain=TD, lease_ttl=1.0, kv_replicas=3)
    async with (
        connect(cluster.nodes[0].url, creds_file=creds["controlplane"]) as bus,
        trio.open_nursery() as nursery,
    ):
        ca = CaActor(config)
        await nursery.start(ca.run, ActorContext(bus=bus, replica="cp-multihost"))
        with trio.fail_after(15):
            await ca.leading.wait()
        yield bus
        nursery.cancel_scope.cancel()


def client_snapshot(servers: list[netns.Host]) -> dict[str, Any]:
    return {
        "version": "multihost-1",
        "service": "frontend",
        "services": [
            {
                "name": "catalog",
                "routes": [
                    {
                        "name": "default",
                        # Generous: a loaded CI machine must not turn slowness into 504s.
                        # A keep-alive connection to the lost host may not have seen its
                        # FIN before the links went down: that try hangs until the per-try
                        # timeout, and `timeout` makes it a retry instead of a 504.
                        "timeout": 20.0,
                        "retries": {"attempts": 3, "per_try_timeout": 4.0, "on": ["connect-failure", "reset", "timeout", 503]},
                    }
                ],
            }
        ],
        "clusters": [
            {
                # mTLS to these endpoints; the expected server identity is the default,
                # spiffe://TD/ns/<own ns>/sa/catalog.
                "name": "catalog",
                "connect_timeout": 0.5,
                "subsets": {"v1": [f"{h.ip}:15006" for h in servers]},
                "outlier": {"consecutive_5xx": 2, "base_ejection_seconds": 30},
            }
        ],
    }


async def probe(host: netns.Host, addr: str, port: int, count: int, *extra: str) -> list[dict[str, Any]]:
    """`count` requests from `host` to addr:port (see PROBE)."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [*host.exec_prefix, PY, "-c", PROBE, addr, str(port), str(count), *extra],
            capture_stdout=True, check=True,
        )  # fmt: skip
    return [json.loads(line) for line in result.stdout.decode().splitlines()]


async def load_from(host: netns.Host, port: int, n: int) -> dict[str, Any]:
    with trio.fail_after(60):
        result = await trio.run_process(
            [*host.exec_prefix, PY, "-m", "mesh", "load", f"http://127.0.0.1:{port}/anything",
             "--host", "catalog", "-n", str(n), "-c", "4", "-d", "30", "--json"],
            capture_stdout=True, check=False,
        )  # fmt: skip
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


async def test_traffic_crosses_hosts_over_mtls_and_survives_losing_one(
    three_hosts: list[netns.Host],
    cluster: NatsCluster,
    ca_bus: Bus,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    h1, h2, h3 = three_hosts
    snap = tmp_path / "frontend.json"
    snap.write_text(json.dumps(client_snapshot([h2, h3])))
    empty = tmp_path / "catalog.json"
    empty.write_text(json.dumps({"version": "multihost-1", "service": "catalog"}))

    async def identity_flags(host: netns.Host, node: int, sa: str) -> list[str]:
        # One single-use join token per sidecar; certificates over the host's own NATS node
        # (--ca-nats: no config sync, the static --config snapshot stays in charge).
        text, _ = await create_token(ca_bus, SpiffeId(TD, NS, sa), uses=1)
        token_file = tmp_path / f"token-{host.name}"
        token_file.write_text(text)
        token_file.chmod(0o600)
        return ["--ca-nats", cluster.nodes[node].url, "--identity", ident(sa),
                "--token-file", str(token_file), "--identity-timeout", "20",
                "--creds", creds[f"sidecar-{host.name}"]]  # fmt: skip

    async with trio.open_nursery() as nursery:
        children: dict[str, ChildProcess] = {}
        for node, host in ((1, h2), (2, h3)):
            app = ChildProcess(
                f"{host.name}/catalog",
                [*host.exec_prefix, PY, APP, "--name", host.name, "--port", "9080"],
                restart=False,
            )
            children[app.name] = await nursery.start(app.run)
            sidecar = ChildProcess(
                f"{host.name}/sidecar",
                [*host.exec_prefix, PY, "-m", "mesh", "sidecar", "--service", "catalog", "--app-port", "9080",
                 "--config", str(empty), "--inbound-host", "0.0.0.0", "--admin-port", "0", "--outbound-port", "0",
                 *await identity_flags(host, node, "catalog"), "--mtls", "STRICT"],
                restart=False,
            )  # fmt: skip
            children[sidecar.name] = await nursery.start(sidecar.run)
        client = ChildProcess(
            f"{h1.name}/sidecar",
            [*h1.exec_prefix, PY, "-m", "mesh", "sidecar", "--service", "frontend", "--app-port", "9080",
             "--config", str(snap), "--outbound-port", "15001", "--admin-port", "0", "--inbound-port", "0",
             *await identity_flags(h1, 0, "frontend")],
            restart=False,
        )  # fmt: skip
        await nursery.start(client.run)

        # Over mTLS: the apps on h2 and h3 see the caller's verified identity (a
        # self-declared one from the app is dropped and replaced).
        replies = await probe(h1, "127.0.0.1", 15001, 8, f"x-mesh-peer-identity: {ident('admin')}")
        served = set()
        for reply in replies:
            assert reply["status"] == 200, reply
            body = json.loads(reply["body"])
            assert body["headers"]["x-mesh-peer-identity"] == ident("frontend"), body
            served.add(body["name"])
        assert served == {h2.name, h3.name}, replies
        # STRICT: plaintext straight to h2's inbound port from h1 is accepted by the listener
        # and closed before any HTTP (the same port that just served mTLS).
        assert [r["status"] for r in await probe(h1, h2.ip, 15006, 1)] == [0]

        # Locked down: an anonymous client is refused by every node.
        with pytest.raises(BusConnectError, match="requires credentials"):
            async with connect(cluster.nodes[2].url, connect_timeout=3.0):
                pass

        before = await load_from(h1, 15001, 200)
        assert before["statuses"] == {"200": 200}, before

        # The NATS cluster spans the hosts (over authenticated routes): h1's node relays to a
        # subscriber on h2's node.
        cp = creds["controlplane"]
        async with (
            connect(cluster.nodes[1].url, creds_file=cp) as sub_bus,
            connect(cluster.nodes[0].url, creds_file=cp) as pub_bus,
        ):
            async with sub_bus.subscribe("mesh.t.hosts") as sub:
                pub_bus.publish_nowait("mesh.t.hosts", Blob(label="across", data=b""))
                with trio.fail_after(10):
                    assert (await sub.receive()).body == Blob(label="across", data=b"")

        # Lose h3: its NATS node and its sidecar die, and its network goes.
        cluster.nodes[2].kill()
        children[f"{h3.name}/sidecar"].stop(sig=9)
        netns.isolate(h3)

        after = await load_from(h1, 15001, 200)
        assert after["statuses"] == {"200": 200}, after
        # Still mTLS, now all served by h2.
        for reply in await probe(h1, "127.0.0.1", 15001, 3):
            assert reply["status"] == 200, reply
            body = json.loads(reply["body"])
            assert (body["name"], body["headers"]["x-mesh-peer-identity"]) == (h2.name, ident("frontend"))
        async with (
            connect(cluster.nodes[1].url, creds_file=cp) as sub_bus,
            connect(cluster.nodes[0].url, creds_file=cp) as pub_bus,
        ):
            async with sub_bus.subscribe("mesh.t.hosts") as sub:
                pub_bus.publish_nowait("mesh.t.hosts", Blob(label="still", data=b""))
                with trio.fail_after(10):
                    assert (await sub.receive()).body == Blob(label="still", data=b"")
        nursery.cancel_scope.cancel()
