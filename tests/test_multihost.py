"""Three hosts (network namespaces on a bridge): a NATS node on each, sidecars calling across
hosts, and the loss of one host leaving the other two serving."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from bus.client import connect
from bus.server import NatsCluster
from deploy import netns
from deploy.supervisor import ChildProcess
from mesh.messages import Blob

pytestmark = pytest.mark.slow

PY = sys.executable


@pytest.fixture
def three_hosts() -> Iterator[list[netns.Host]]:
    reason = netns.available()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    with netns.hosts(3) as hosts:
        yield hosts


@pytest.fixture
async def cluster(three_hosts: list[netns.Host], tmp_path: Path) -> AsyncIterator[NatsCluster]:
    spec = [(h.ip, h.exec_prefix) for h in three_hosts]
    async with trio.open_nursery() as nursery:
        yield await nursery.start(NatsCluster(0, tmp_path / "nats", hosts=spec).run)
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
                        "timeout": 20.0,
                        "retries": {"attempts": 3, "per_try_timeout": 8.0, "on": ["connect-failure", "reset", 503]},
                    }
                ],
            }
        ],
        "clusters": [
            {
                "name": "catalog",
                "connect_timeout": 0.5,
                "subsets": {"v1": [f"{h.ip}:15006" for h in servers]},
                "outlier": {"consecutive_5xx": 2, "base_ejection_seconds": 30},
            }
        ],
    }


async def load_from(host: netns.Host, port: int, n: int) -> dict[str, Any]:
    with trio.fail_after(60):
        result = await trio.run_process(
            [*host.exec_prefix, PY, "-m", "mesh", "load", f"http://127.0.0.1:{port}/items",
             "--host", "catalog", "-n", str(n), "-c", "4", "-d", "30", "--json"],
            capture_stdout=True, check=False,
        )  # fmt: skip
    summary: dict[str, Any] = json.loads(result.stdout)
    return summary


async def test_traffic_crosses_hosts_and_survives_losing_one(
    three_hosts: list[netns.Host], cluster: NatsCluster, tmp_path: Path
) -> None:
    h1, h2, h3 = three_hosts
    snap = tmp_path / "frontend.json"
    snap.write_text(json.dumps(client_snapshot([h2, h3])))
    empty = tmp_path / "catalog.json"
    empty.write_text(json.dumps({"version": "multihost-1", "service": "catalog"}))

    async with trio.open_nursery() as nursery:
        children: dict[str, ChildProcess] = {}
        for host in (h2, h3):
            app = ChildProcess(
                f"{host.name}/catalog",
                [*host.exec_prefix, PY, "-m", "deploy.demo.app", "--role", "catalog", "--port", "9080"],
                restart=False,
            )
            children[app.name] = await nursery.start(app.run)
            sidecar = ChildProcess(
                f"{host.name}/sidecar",
                [*host.exec_prefix, PY, "-m", "mesh", "sidecar", "--service", "catalog", "--app-port", "9080",
                 "--config", str(empty), "--inbound-host", "0.0.0.0", "--admin-port", "0", "--outbound-port", "0"],
                restart=False,
            )  # fmt: skip
            children[sidecar.name] = await nursery.start(sidecar.run)
        client = ChildProcess(
            f"{h1.name}/sidecar",
            [*h1.exec_prefix, PY, "-m", "mesh", "sidecar", "--service", "frontend", "--app-port", "9080",
             "--config", str(snap), "--outbound-port", "15001", "--admin-port", "0", "--inbound-port", "0"],
            restart=False,
        )  # fmt: skip
        await nursery.start(client.run)

        before = await load_from(h1, 15001, 200)
        assert before["statuses"] == {"200": 200}, before

        # The NATS cluster spans the hosts: h1's node relays to a subscriber on h2's node.
        async with connect(cluster.nodes[1].url) as sub_bus, connect(cluster.nodes[0].url) as pub_bus:
            async with sub_bus.subscribe("t.hosts") as sub:
                pub_bus.publish_nowait("t.hosts", Blob(label="across", data=b""))
                with trio.fail_after(10):
                    assert (await sub.receive()).body == Blob(label="across", data=b"")

        # Lose h3: its NATS node and its sidecar die, and its network goes.
        cluster.nodes[2].kill()
        children[f"{h3.name}/sidecar"].stop(sig=9)
        netns.isolate(h3)

        after = await load_from(h1, 15001, 200)
        assert after["statuses"] == {"200": 200}, after
        async with connect(cluster.nodes[1].url) as sub_bus, connect(cluster.nodes[0].url) as pub_bus:
            async with sub_bus.subscribe("t.hosts") as sub:
                pub_bus.publish_nowait("t.hosts", Blob(label="still", data=b""))
                with trio.fail_after(10):
                    assert (await sub.receive()).body == Blob(label="still", data=b"")
        nursery.cancel_scope.cancel()
