"""Config propagation: time from an apply until every sidecar has ACKed, plus control-plane cost.

    .venv/bin/python bench/propagation.py [--sidecars 40] [--sims 10000] [--workers 4]
                                          [--changes 5]

Starts its own nats-server and one `mesh controlplane` process, then:

1. `--sidecars` real `mesh sidecar --nats` processes (service `edge`, no app behind them);
2. `--sims` simulated config clients (services `client-0..9`) spread over `--workers`
   processes: each client is its own `ClientSync` (mesh/sync.py) that registers with a full
   request, applies every push (delta or full) on its own base, ACKs with the push's nonce
   and heartbeats every 10 s. A worker holds one NATS connection and one subscription per
   service, like one sidecar does, and fans pushes out to its clients in-process.

For each change (a weight shift of `backend`'s route, which every client depends on, written to
KV as `mesh apply` does) it prints the time from the write until each ACK reaches an observer
on the bus (p50/p99/max over all clients), the control-plane process CPU (user+sys from
/proc), the bytes the control plane published, and the bytes NATS delivered (fan-out).
Goal (issue 4): p99 <= 1 s for 10,000 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bus import subjects  # noqa: E402
from bus.client import Bus, connect  # noqa: E402
from bus.server import NatsServer, NodeSpec  # noqa: E402
from bus.subscription import Overflow  # noqa: E402
from mesh.messages import ConfigAck, SnapshotPush  # noqa: E402
from mesh.processes import terminate_all  # noqa: E402
from mesh.resources import ResourceSet, parse_text  # noqa: E402
from mesh.resources_store import Store  # noqa: E402
from mesh.snapshot import Snapshot  # noqa: E402
from mesh.sync import Apply, ClientSync, RequestFull  # noqa: E402

MESH = str(Path(sys.executable).parent / "mesh")
SIM_SERVICES = 10
ENV = {**os.environ, "MESH_CA_SECRET": "bench-propagation-secret-0123456789"}


def resources(weight_v1: int) -> ResourceSet:
    docs = [
        "kind: Service\nname: backend",
        "kind: DestinationPolicy\nname: backend\nspec: {service: backend, subsets: "
        "{v1: {version: v1}, v2: {version: v2}}}",
        f"kind: Route\nname: backend\nspec: {{service: backend, rules: [{{split: "
        f"{{v1: {weight_v1}, v2: {100 - weight_v1}}}}}]}}",
        "kind: Service\nname: edge\nspec: {dependencies: [backend]}",
        *(
            f"kind: Service\nname: client-{i}\nspec: {{dependencies: [backend]}}"
            for i in range(SIM_SERVICES)
        ),
    ]
    out = {}
    for r in parse_text("\n---\n".join(docs), "bench"):
        out[r.key] = r
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_out_bytes(http_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/varz", timeout=5) as r:
        return int(json.load(r)["out_bytes"])


async def read_ready(proc: trio.Process, timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while True:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"{proc.args!r} exited before ready")
            buf += chunk
            for line in buf.split(b"\n")[:-1]:
                if line.startswith(b"{"):
                    info: dict[str, Any] = json.loads(line)
                    return info


class Observer:
    """Listens to every ACK on the bus and times the ones that arrive after a change."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.acked: dict[str, float] = {}
        self.nacks = 0
        self.armed = False

    async def run(self, bus: Bus, *, task_status: trio.TaskStatus[None]) -> None:
        async with bus.subscribe(
            subjects.CONFIG_ACK_ALL, capacity=1 << 17, overflow=Overflow.DROP_NEWEST
        ) as acks:
            task_status.started()
            async for d in acks:
                ack = d.body
                if self.armed and isinstance(ack, ConfigAck):
                    if not ack.ok:
                        self.nacks += 1
                    elif ack.instance not in self.acked:
                        self.acked[ack.instance] = trio.current_time() - self.t0


async def status_stats(bus: Bus) -> dict[str, Any]:
    from mesh.cli.apply_cmd import fetch_status

    st = await fetch_status(bus, timeout=10, rows=False)
    return {"stats": st.stats, "synced": st.counts.get("SYNCED", 0), "sidecars": st.total}


async def wait_synced(bus: Bus, count: int, timeout: float) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                s = await status_stats(bus)
                if s["synced"] >= count:
                    return
            except Exception:  # the control plane may still be warming up
                pass
            await trio.sleep(0.5)


async def measure(
    label: str,
    bus: Bus,
    store: Store,
    obs: Observer,
    expected: int,
    changes: int,
    cp_pid: int,
    http_port: int,
) -> dict[str, Any]:
    lat: list[float] = []
    cpu: list[float] = []
    cp_bytes: list[int] = []
    nats_bytes: list[int] = []
    complete = []
    for i in range(changes):
        current = await store.current()
        before_cpu, before_st = cpu_seconds(cp_pid), (await status_stats(bus))["stats"]
        before_nats = nats_out_bytes(http_port)
        obs.acked = {}
        obs.armed = True
        obs.t0 = trio.current_time()
        await store.write(
            resources(90 - 10 * (i % 5) if i % 2 else 10 + 10 * (i % 5)),
            current.revision,
            f"bench {label} {i}",
        )
        with trio.move_on_after(30):
            while len(obs.acked) < expected:
                await trio.sleep(0.01)
        obs.armed = False
        complete.append(max(obs.acked.values()) if obs.acked else float("nan"))
        got = len(obs.acked)
        await trio.sleep(0.5)  # let the control plane finish counting acks
        lat.extend(obs.acked.values())
        after_st = (await status_stats(bus))["stats"]
        cpu.append(cpu_seconds(cp_pid) - before_cpu)
        cp_bytes.append(
            after_st["push_bytes"]
            + after_st["full_bytes"]
            - before_st["push_bytes"]
            - before_st["full_bytes"]
        )
        nats_bytes.append(nats_out_bytes(http_port) - before_nats)
        if got < expected:
            print(f"  change {i}: only {got}/{expected} ACKed within 30 s", flush=True)
        await trio.sleep(0.5)
    result = {
        "case": label,
        "clients": expected,
        "changes": changes,
        "ack_p50_ms": round(pct(lat, 0.5) * 1000, 1),
        "ack_p99_ms": round(pct(lat, 0.99) * 1000, 1),
        "ack_max_ms": round(max(lat) * 1000, 1) if lat else None,
        "all_acked_ms_median": round(statistics.median(complete) * 1000, 1),
        "cp_cpu_s_per_change": round(statistics.median(cpu), 3),
        "cp_bytes_per_change": int(statistics.median(cp_bytes)),
        "nats_out_bytes_per_change": int(statistics.median(nats_bytes)),
        "nacks": obs.nacks,
    }
    print(json.dumps(result), flush=True)
    return result


async def spawn(
    nursery: trio.Nursery, cmd: list[str], procs: list[trio.Process], stderr: Path | None = None
) -> dict[str, Any]:
    with open(stderr or os.devnull, "ab") as err:  # noqa: ASYNC230 - local file, once
        proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err, env=ENV)
    procs.append(proc)
    return await read_ready(proc)


async def stop_all(procs: list[trio.Process]) -> None:
    await terminate_all(procs, grace=10)
    procs.clear()


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    async with trio.open_nursery() as nursery:
        server: NatsServer = await nursery.start(NatsServer(NodeSpec("bench", tmp / "nats")).run)
        url = server.url
        cp_procs: list[trio.Process] = []
        procs: list[trio.Process] = []
        try:
            await spawn(
                nursery,
                [MESH, "controlplane", "--nats", url, "--ready-line"],
                cp_procs,
                stderr=tmp / "controlplane.stderr",
            )
            print(f"control-plane log: {tmp / 'controlplane.stderr'}", flush=True)
            cp_pid = cp_procs[0].pid
            async with connect(url, name="bench") as bus:
                store = await Store.open(bus)
                await store.write(resources(100), (await store.current()).revision, "bench")
                obs = Observer()
                await nursery.start(obs.run, bus)
                print(f"nats {url}; control plane pid {cp_pid}; {os.cpu_count()} CPUs", flush=True)
                if args.sidecars:
                    start = time.monotonic()
                    for i in range(args.sidecars):
                        await spawn(
                            nursery,
                            [
                                MESH,
                                "sidecar",
                                "--service",
                                "edge",
                                "--version",
                                "v1",
                                "--app-port",
                                "9",
                                "--nats",
                                url,
                                "--instance",
                                f"edge-{i}",
                                "--heartbeat",
                                "2",
                                "--outbound-port",
                                "0",
                                "--inbound-port",
                                "0",
                                "--admin-port",
                                "0",
                            ],
                            procs,
                        )
                    await wait_synced(bus, args.sidecars, 60)
                    print(
                        f"{args.sidecars} sidecars up and synced in "
                        f"{time.monotonic() - start:.1f} s",
                        flush=True,
                    )
                    await measure(
                        "real sidecars",
                        bus,
                        store,
                        obs,
                        args.sidecars,
                        args.changes,
                        cp_pid,
                        server.spec.http_port,
                    )
                    await stop_all(procs)
                if args.sims:
                    start = time.monotonic()
                    per = args.sims // args.workers
                    async with trio.open_nursery() as starting:
                        for w in range(args.workers):
                            starting.start_soon(
                                spawn,
                                nursery,
                                [
                                    sys.executable,
                                    __file__,
                                    "--worker",
                                    "--nats",
                                    url,
                                    "--count",
                                    str(per),
                                    "--offset",
                                    str(w * per),
                                ],
                                procs,
                            )
                    await wait_synced(bus, per * args.workers, 120)
                    print(
                        f"{per * args.workers} simulated clients in {args.workers} processes "
                        f"registered and synced in {time.monotonic() - start:.1f} s",
                        flush=True,
                    )
                    await measure(
                        "simulated clients",
                        bus,
                        store,
                        obs,
                        per * args.workers,
                        args.changes,
                        cp_pid,
                        server.spec.http_port,
                    )
        finally:
            with trio.CancelScope(shield=True):
                await stop_all(procs)
                await stop_all(cp_procs)
            nursery.cancel_scope.cancel()


# --- a worker process: many simulated config clients ----------------------------------------


async def worker(args: argparse.Namespace) -> None:
    clients = [
        ClientSync(
            instance=f"sim-{args.offset + i}",
            service=f"client-{(args.offset + i) % SIM_SERVICES}",
            label="v1",
        )
        for i in range(args.count)
    ]
    by_service: dict[str, list[ClientSync]] = {}
    for c in clients:
        by_service.setdefault(c.service, []).append(c)
    checked: dict[str, str | None] = {}  # version -> error, one Snapshot check per process

    def check(action: Apply) -> str | None:
        if action.version not in checked:
            try:
                Snapshot.from_dict(action.snapshot)
                checked[action.version] = None
            except Exception as exc:  # a refusal is a NACK, whatever it is
                checked[action.version] = str(exc)
        return checked[action.version]

    async with connect(args.nats, name=f"sim-{args.offset}", outbox_capacity=1 << 17) as bus:

        async def fetch(c: ClientSync, reason: str) -> None:
            for _ in range(20):
                try:
                    push = await bus.request(
                        subjects.config_full(c.service, c.instance), c.hello(reason), SnapshotPush, timeout=10
                    )
                except Exception:  # retried
                    await trio.sleep(0.5)
                    continue
                handle(c, push)
                return

        def handle(c: ClientSync, push: SnapshotPush) -> Any:
            action = c.on_push(push)
            if isinstance(action, Apply):
                bus.publish_nowait(subjects.config_ack(c.service, c.instance), c.applied(check(action)))
            return action

        async def listen(service: str, *, task_status: trio.TaskStatus[None]) -> None:
            async with bus.subscribe(subjects.config_push(service), capacity=1024) as sub:
                task_status.started()
                async for d in sub:
                    if isinstance(d.body, SnapshotPush):
                        for c in by_service[service]:
                            if isinstance(handle(c, d.body), RequestFull):
                                nursery.start_soon(fetch, c, "gap")

        async def heartbeats() -> None:
            interval = 10.0
            while True:
                step = interval / max(1, len(clients))
                for i, c in enumerate(clients):
                    bus.publish_nowait(subjects.config_heartbeat(c.service, c.instance), c.heartbeat(interval))
                    if i % 100 == 99:
                        await trio.sleep(step * 100)

        async with trio.open_nursery() as nursery:
            for service in by_service:
                await nursery.start(listen, service)
            send, recv = trio.open_memory_channel[ClientSync](len(clients))
            for c in clients:
                send.send_nowait(c)
            send.close()

            async def fetcher() -> None:
                async for c in recv:
                    await fetch(c, "start")

            async with trio.open_nursery() as fetching:
                for _ in range(32):
                    fetching.start_soon(fetcher)
            nursery.start_soon(heartbeats)
            print(
                json.dumps(
                    {
                        "event": "ready",
                        "clients": len(clients),
                        "synced": sum(bool(c.version) for c in clients),
                    }
                ),
                flush=True,
            )


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sidecars", type=int, default=40, help="real sidecar processes")
    ap.add_argument("--sims", type=int, default=10000, help="simulated config clients")
    ap.add_argument("--workers", type=int, default=4, help="processes for the simulated clients")
    ap.add_argument("--changes", type=int, default=5, help="changes measured per case")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nats", help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        trio.run(worker if args.worker else main, args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    cli()
