"""The demo as a newcomer meets it: the README's main job, `mesh up --demo`, and nothing else
(no `mesh load`: the demo's own background load must light up `mesh top`), with SPIFFE
identities and mTLS between its sidecars; then the README walkthrough against the live demo.
Real processes throughout: nats-server, the control plane, apps, sidecars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from deploy.topology import demo_topology_path, load_topology
from deploy.topology_plan import make_plan, topology_resources
from mesh.processes import terminate
from mesh.snapshot import Snapshot

MESH = [sys.executable, "-m", "mesh"]
WALKTHROUGH = Path(__file__).resolve().parent.parent / "deploy" / "demo" / "walkthrough"

# Every edge the demo's background load must show in `mesh top`, catalog -> stock (opaque
# TCP, counted in connections and bytes) included.
DEMO_EDGES = {("ingress", "frontend"), ("frontend", "catalog"), ("catalog", "ratings"),
              ("catalog", "stock")}
# Service accounts of the demo's sidecars.
DEMO_ACCOUNTS = {"ingress", "frontend", "catalog", "ratings", "stock"}


@dataclass
class Demo:
    proc: trio.Process
    info: dict[str, Any]
    state_dir: Path
    output: list[bytes] = field(default_factory=list)
    # Set at EOF on the output pipe: every process that could write to it is gone.
    drained: trio.Event = field(default_factory=trio.Event)

    @property
    def nats(self) -> str:
        urls: list[str] = self.info["nats"]
        return urls[0]

    @property
    def ingress(self) -> int:
        port: int = self.info["topology"]["ingress"]
        return port

    def instance(self, name: str) -> dict[str, Any]:
        inst: dict[str, Any] = self.info["topology"]["instances"][name]
        return inst

    async def mesh(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """A `mesh` command against this demo's NATS, as a user types it (with the admin
        credentials `mesh up` wrote in its state directory)."""
        with trio.fail_after(timeout):
            return await trio.run_process(
                [*MESH, *args, "--nats", self.nats],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "MESH_STATE_DIR": str(self.state_dir)},
            )

    async def top(self) -> list[dict[str, Any]]:
        result = await self.mesh("top", "--once", "--json")
        if result.returncode != 0:
            return []
        edges: list[dict[str, Any]] = json.loads(result.stdout)["edges"]
        return edges


@asynccontextmanager
async def demo(tmp_path: Path, *extra: str) -> AsyncIterator[Demo]:
    """`mesh up --demo` with free ports; stdout and stderr (one pipe, as in a terminal)
    drained all along (a full pipe would stall the supervisor) and kept, so a test can
    check what the user saw."""
    env = {**os.environ, "MESH_DASHBOARD_PORT": "off", "MESH_METRICS_PORT": "off"}
    proc = await trio.lowlevel.open_process(
        [*MESH, "up", "--demo", "--nats-port", "0", "--ingress-port", "0",
         "--state-dir", str(tmp_path), "--ready-line", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    output: list[bytes] = []
    drained = trio.Event()
    ready, ready_rx = trio.open_memory_channel[dict[str, Any]](1)

    async def drain() -> None:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            output.append(bytes(chunk))
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b'{"event": "ready"'):
                    ready.send_nowait(json.loads(line))
        drained.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            with trio.fail_after(60):
                async with ready_rx:
                    info = await ready_rx.receive()
            yield Demo(proc, info, tmp_path, output, drained)
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:  # a failed test: stop it the way a user would first
            await terminate(proc, grace=15)


async def get(port: int, path: str = "/", host: str = "localhost", *headers: str) -> bytes:
    """One request on its own connection; b"" if the server closed without answering."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close", *headers]
        raw = b""
        try:
            await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
            while chunk := await stream.receive_some(65536):
                raw += chunk
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()
    return raw


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def body_of(raw: bytes) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    return body


async def catalog_versions(port: int, n: int, *headers: str) -> list[str]:
    return [body_of(await get(port, "/", "localhost", *headers))["catalog"]["version"] for _ in range(n)]


async def port_open(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def stop(d: Demo, sig: int = signal.SIGINT) -> str:
    """Ctrl-C, as a user stops it: exit 0, every app and sidecar port closed, and nothing
    in the whole output (stdout and stderr of `mesh up` and all its children) that a user
    would take for a crash. Returns what was printed after the signal."""
    ports = [p for inst in d.info["topology"]["instances"].values() for p in (inst["app"], inst["inbound"]) if p]
    before = sum(len(chunk) for chunk in d.output)
    d.proc.send_signal(sig)
    with trio.fail_after(30):
        assert await d.proc.wait() == 0
        await d.drained.wait()
    assert [p for p in ports if await port_open(p)] == []
    raw = b"".join(d.output)
    output = raw.decode(errors="replace")
    assert "Traceback" not in output, output
    assert "never awaited" not in output, output
    return raw[before:].decode(errors="replace")


def test_demo_plan_gives_every_sidecar_a_valid_snapshot_and_strict_mtls() -> None:
    counter = iter(range(30000, 31000))
    topology = load_topology(demo_topology_path())
    plan = make_plan(topology, lambda: next(counter))
    snaps = {i.name: Snapshot.from_dict(i.snapshot) for i in plan.instances if i.snapshot}
    assert set(snaps) == {"frontend-v1-1", "catalog-v1-1", "catalog-v2-1", "ratings-v1-1", "stock-v1-1", "ingress"}
    catalog = snaps["frontend-v1-1"].clusters[0]
    assert catalog.name == "catalog" and {name for name, _ in catalog.subsets} == {"v1", "v2"}
    assert [t.name for t in snaps["catalog-v2-1"].tcp] == ["stock"]
    # stock has a sidecar whose inbound is opaque TCP; callers reach it, not the app.
    stock = next(i for i in plan.instances if i.name == "stock-v1-1")
    assert snaps["stock-v1-1"].inbound.tcp is not None
    stock_cluster = snaps["catalog-v2-1"].cluster("stock")
    assert stock_cluster is not None and [e.port for e in stock_cluster.subsets[0][1]] == [stock.inbound_port]
    # The control plane keeps the topology's mode in the snapshots it compiles.
    policies = [r for r in topology_resources(topology) if r["kind"] == "DestinationPolicy"]
    assert {p["spec"]["mtls"] for p in policies} == {"strict"}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_stopping_the_demo_prints_no_traceback(tmp_path: Path, sig: int) -> None:
    """Every sidecar sends its leaving heartbeat on the way out; that used to crash each one
    with a traceback (and "coroutine ... never awaited" warnings) in the user's terminal."""
    async with demo(tmp_path) as d:
        # A healthy start prints the banner and little else: routine events (each sidecar's
        # snapshot loads, the CA's new root) are INFO, shown with -v.
        start = b"".join(d.output).decode(errors="replace")
        assert "snapshot version" not in start, start
        assert [line for line in start.splitlines() if " WARNING " in line] == [], start
        after = await stop(d, sig)
    # One line says the signal was seen; the rest of the stop is quiet (no line per process).
    assert f"{signal.Signals(sig).name} received" in after, after
    assert [line for line in after.splitlines() if line.strip()] == [
        line for line in after.splitlines() if "mesh.up: " in line
    ], after


async def test_mesh_up_demo_alone_lights_every_edge_over_mtls(tmp_path: Path) -> None:
    started = trio.current_time()
    async with demo(tmp_path) as d:
        ready_s = trio.current_time() - started
        # The banner tells a newcomer what to do next.
        banner = b"".join(d.output).decode()
        assert "requests/s through the ingress in the background" in banner
        assert "Next, in another shell:" in banner and " top " in banner

        # First 200 through the ingress (the user's curl).
        with trio.fail_after(30):
            while status_of(await get(d.ingress)) != 200:
                await trio.sleep(0.05)
        first_200_s = trio.current_time() - started

        # No `mesh load`: the demo's background load alone must show every edge.
        first_seen: dict[tuple[str, str], float] = {}
        with trio.fail_after(60):
            while not DEMO_EDGES <= set(first_seen):
                for e in await d.top():
                    if e["requests"] > 0 or e.get("tcp_sent_bps", 0) > 0:
                        first_seen.setdefault((e["src"], e["dst"]), trio.current_time() - started)
                await trio.sleep(0.25)
        all_edges_s = max(first_seen[e] for e in DEMO_EDGES)
        print(
            f"\ndemo: ready {ready_s:.2f} s, first 200 {first_200_s:.2f} s, every edge in mesh top "
            f"{all_edges_s:.2f} s ("
            + ", ".join(f"{s}->{t} {first_seen[(s, t)]:.2f} s" for s, t in sorted(DEMO_EDGES))
            + ")"
        )

        # Every demo sidecar holds a SPIFFE certificate for its service account...
        certs = await d.mesh("certs", "--json", "--wait", "2")
        agents = [json.loads(line) for line in certs.stdout.decode().splitlines()]
        assert {a["identity"].rsplit("/sa/", 1)[1] for a in agents} == DEMO_ACCOUNTS, agents
        assert len(agents) == 6 and all(a["serial"] and not a["last_error"] for a in agents), agents
        assert all(a["identity"].startswith("spiffe://") and "/ns/demo/sa/" in a["identity"] for a in agents)
        # ...and the sidecars speak mTLS only: plaintext to an inbound port gets no answer
        # (STRICT), while the same call through the mesh works.
        assert await get(d.instance("catalog-v2-1")["inbound"], "/items", "catalog") == b""
        assert status_of(await get(d.ingress)) == 200

        # The join tokens went by file (0600), never on a command line nor in the output.
        tokens = {p.name: p.read_text().strip() for p in (d.state_dir / "tokens").iterdir()}
        assert set(tokens) == {f"{a}.token" for a in DEMO_ACCOUNTS}
        assert all(((d.state_dir / "tokens" / n).stat().st_mode & 0o777) == 0o600 for n in tokens)
        cmdlines = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:  # noqa: ASYNC230 (procfs)
                        cmdlines.append(f.read().decode(errors="replace"))
                except OSError:
                    pass
        for text in tokens.values():
            assert not [c for c in cmdlines if text in c]
            assert text not in b"".join(d.output).decode()

        await stop(d)


async def test_readme_walkthrough_on_the_live_demo(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        v2_admin = d.instance("catalog-v2-1")["admin"]

        # Beta users see catalog v2; everyone else stays on 95/5 (mostly v1).
        applied = await d.mesh("apply", "-f", str(WALKTHROUGH / "catalog-beta.yaml"), "--wait", "20")
        assert applied.returncode == 0, applied.stderr.decode()
        assert set(await catalog_versions(d.ingress, 10, "x-user: beta")) == {"v2"}
        assert "v1" in await catalog_versions(d.ingress, 20)

        # The canary: 50/50 (both answer), then 100% v2.
        for weights, wanted in (("v1=50 v2=50", {"v1", "v2"}), ("v1=0 v2=100", {"v2"})):
            shift = await d.mesh("route", "weights", "catalog", *weights.split(), "--wait", "20")
            assert shift.returncode == 0, shift.stderr.decode()
            assert set(await catalog_versions(d.ingress, 40)) == wanted, weights
        # v2 reaches ratings (HTTP, mTLS) and stock (opaque TCP) under control-plane snapshots.
        items = body_of(await get(d.ingress))["catalog"]["items"]
        assert [(i["sku"], i["stars"], i["stock"]) for i in items] == [("tea", 5, 21), ("mug", 4, 21)]
        # The TCP listener is compiled from the `protocol: tcp` Service (subset "default").
        dump = json.loads((await get(v2_admin, "/config_dump", "admin")).split(b"\r\n\r\n", 1)[1])
        assert [(t["name"], t["subset"]) for t in dump["snapshot"]["tcp"]] == [("stock", "default")]

        async def load(n: int) -> dict[str, Any]:
            result = await trio.run_process(
                [*MESH, "load", f"http://127.0.0.1:{d.ingress}/", "-n", str(n), "-c", "4", "-d", "60", "--json"],
                capture_stdout=True, check=False,
            )  # fmt: skip
            summary: dict[str, Any] = json.loads(result.stdout)
            return summary

        async def retries() -> float:
            metrics = (await get(v2_admin, "/metrics", "localhost")).decode()
            line = next(x for x in metrics.splitlines() if x.startswith("mesh_sidecar_retries_total "))
            return float(line.split()[1])

        # A 10% fault on ratings, retried (5 tries): the client sees no error (a request fails
        # only if all 5 tries do, 1 in 100,000), and catalog v2's sidecar counts the retries.
        applied = await d.mesh("apply", "-f", str(WALKTHROUGH / "ratings-fault.yaml"), "--wait", "20")
        assert applied.returncode == 0, applied.stderr.decode()
        before = await retries()
        hidden = await load(300)
        assert hidden["statuses"] == {"200": 300}, hidden
        assert await retries() > before
        # `mesh top` shows what the retries hid: callers saw 100%, the tries did not.
        with trio.fail_after(30):
            while True:
                edge = {(e["src"], e["dst"]): e for e in await d.top()}.get(("catalog", "ratings"))
                if edge is not None and edge["retries"] > 0:
                    break
                await trio.sleep(0.5)
        assert edge["success_rate"] == 1.0 and edge["actual_success_rate"] < 1.0, edge

        # The same fault without retries: failures reach the client as 500 (about 10%), and
        # `mesh top` shows the catalog -> ratings edge below 100%.
        applied = await d.mesh("apply", "-f", str(WALKTHROUGH / "ratings-fault-no-retries.yaml"), "--wait", "20")
        assert applied.returncode == 0, applied.stderr.decode()
        shown = await load(300)
        assert set(shown["statuses"]) == {"200", "500"} and shown["statuses"]["500"] >= 5, shown
        with trio.fail_after(30):
            while True:
                rates = {(e["src"], e["dst"]): e["success_rate"] for e in await d.top()}
                if rates.get(("catalog", "ratings"), 1.0) < 1.0:
                    break
                await trio.sleep(0.5)

        await stop(d)
