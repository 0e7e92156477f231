"""Telemetry benchmark: request-path recorder cost and aggregator ingest capacity.

    .venv/bin/python bench/telemetry.py [--calls 300000] [--sidecars 10000] [--seconds 3]

(a) Per-request cost on the sidecar: `Recorder.record` (what the request path calls
    once per request), next to a bare dict increment and an empty method call measured
    in the same run; also a sampled-out `HopTracer` hop and one `AccessLog.record`.
(b) Aggregator ingest: a child process (plain asyncio nats-py) publishes pre-encoded
    batches from N simulated sidecars at 1 Hz each (two pairs per batch, realistic
    latency spread) to a real nats-server; this process runs the aggregator actor's
    ingest path (bus subscription -> parse_batch -> GraphState.ingest) and reports
    batches merged per second of its own CPU. Reference in the same run: the same
    subscription doing msgpack decode only, and the pure merge without NATS.
    Goal (issue 6): 10,000 sidecars at 1 Hz on one core, i.e. >= 10,000 batches per
    CPU-second with headroom.
(c) Request path through a real `mesh sidecar` (1 hop, nginx upstream, wrk -t1 -c16):
    rps and sidecar CPU per request with telemetry on (metrics, 1 Hz batches to a real
    nats-server, 1 % trace sampling) vs `--no-telemetry`, alternating in rounds (7 by
    default; the loss of every round's pair is shown as a range). The sidecars get a CPU
    of their own and wrk, nginx and NATS the other(s) (--no-pin: shared). --two-hops adds
    client sidecar -> server sidecar -> nginx, where the inbound hop receives a
    traceparent. Goal (issue 6): <= 10 % rps loss. Needs wrk and nginx (apt-get install wrk nginx);
    skipped with a message when the sidecar has no telemetry wiring yet.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/ holds bus.py, which would shadow the `bus` package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import msgpack  # noqa: E402
import trio  # noqa: E402

from actors.telemetry import from_sender  # noqa: E402
from bus import subjects  # noqa: E402
from bus.client import connect  # noqa: E402
from bus.server import NatsServer, NodeSpec  # noqa: E402
from bus.subscription import Overflow  # noqa: E402
from mesh.messages import encode  # noqa: E402
from mesh.stats import PairAgg  # noqa: E402
from mesh.stats_graph import GraphState  # noqa: E402
from mesh.telemetry import build_batch, parse_batch  # noqa: E402
from sidecar.accesslog import AccessLog  # noqa: E402
from sidecar.telemetry import Recorder  # noqa: E402
from sidecar.tracing import HopTracer  # noqa: E402

# --- (a) request path ------------------------------------------------------


def per_call_ns(fn: Any, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter_ns()
        fn(calls)
        best = min(best, (time.perf_counter_ns() - t) / calls)
    return best


def bench_request_path(calls: int) -> None:
    rec = Recorder("default", "frontend", "frontend-1")
    keys = [("frontend", f"svc{i}", "v1") for i in range(4)]
    durations = [random.lognormvariate(-5, 1) for _ in range(1024)]

    def record(n: int) -> None:
        r = rec.record
        for i in range(n):
            src, dst, ver = keys[i & 3]
            r(src, dst, ver, 200, "", durations[i & 1023], 120, 2048)

    counts: dict[tuple[str, str, str], int] = {}

    def dict_ref(n: int) -> None:
        for i in range(n):
            key = keys[i & 3]
            counts[key] = counts.get(key, 0) + 1
            durations[i & 1023]

    class Empty:
        def record(self, *args: Any) -> None:
            pass

    empty = Empty()

    def call_ref(n: int) -> None:
        r = empty.record
        for i in range(n):
            src, dst, ver = keys[i & 3]
            r(src, dst, ver, 200, "", durations[i & 1023], 120, 2048)

    tracer = HopTracer("frontend", sample_ratio=0.0)

    def hop(n: int) -> None:
        for _ in range(n):
            tracer.start_hop("GET /", None, None).finish(200)

    from opentelemetry.trace import SpanKind

    start = tracer.start_request_hop
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"

    def request_hop_new(n: int) -> None:
        for _ in range(n):
            start(b"GET", b"/", None, None, SpanKind.CLIENT)

    def request_hop_child(n: int) -> None:
        for _ in range(n):
            start(b"GET", b"/", parent, None, SpanKind.SERVER)

    alog = AccessLog(io.StringIO())  # flushed in the loop: record + format + write

    def access(n: int) -> None:
        for i in range(n):
            alog.record(
                start_time=1.7e9,
                method="GET",
                path="/users/1",
                authority="backend",
                status=200,
                response_flags="",
                duration=durations[i & 1023],
                upstream="127.0.0.1:8080",
                source="frontend",
                request_id="r",
                trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
            )
            if i & 1023 == 0:
                alog.flush()  # formats and writes to the StringIO: the full cost of a line

    rec_ns = per_call_ns(record, calls)
    dict_ns = per_call_ns(dict_ref, calls)
    call_ns = per_call_ns(call_ref, calls)
    print(f"# (a) request path, {calls} calls, best of 3")
    print(f"Recorder.record (4 pairs)              {rec_ns:8.0f} ns/op")
    print(
        f"  ref: dict increment, same loop       {dict_ns:8.0f} ns/op   ratio {rec_ns / dict_ns:.1f}"
    )
    print(
        f"  ref: empty method call, same args    {call_ns:8.0f} ns/op   recorder work {rec_ns - call_ns:.0f} ns"
    )
    hop_calls = max(1000, calls // 20)
    print(f"HopTracer hop, sampled out (start+end) {per_call_ns(hop, hop_calls):8.0f} ns/op")
    print(f"  proxy's hop: new trace (batch-drawn)  {per_call_ns(request_hop_new, calls):8.0f} ns/op")
    print(f"  proxy's hop: unsampled in-mesh parent {per_call_ns(request_hop_child, calls):8.0f} ns/op")
    print(f"AccessLog.record (format JSON line)    {per_call_ns(access, hop_calls):8.0f} ns/op")
    print(
        "  (tight-loop costs: between two real requests the same code costs 3-5x more; "
        "(c) measures that)"
    )


# --- (b) aggregator ingest ---------------------------------------------------


def make_batches(sidecars: int, seconds: int) -> list[tuple[str, bytes]]:
    rng = random.Random(1)
    out: list[tuple[str, bytes]] = []
    templates: list[dict[tuple[str, str, str], PairAgg]] = []
    for t in range(16):
        pairs: dict[tuple[str, str, str], PairAgg] = {}
        for p in range(2):
            agg = PairAgg()
            for _ in range(20 + t):
                agg.observe(
                    200 if rng.random() > 0.02 else 503, "", rng.lognormvariate(-5, 0.8), 100, 900
                )
            pairs[(f"svc{t}", f"svc{(t + p + 1) % 16}", "v1")] = agg
        templates.append(pairs)
    for s in range(seconds):
        for i in range(sidecars):
            svc = f"svc{i % 16}"
            batch = build_batch(
                namespace="default",
                service=svc,
                instance=f"{svc}-{i}",
                epoch="e1",
                seq=s + 1,
                ts=1.7e9 + s,
                interval=1.0,
                pairs=templates[i % 16],
            )
            out.append((subjects.telemetry("default", svc, f"{svc}-{i}"), encode(batch)))
    return out


PUBLISHER = r"""
import asyncio, sys, time, msgpack, nats
async def main():
    url, path, sidecars = sys.argv[1], sys.argv[2], int(sys.argv[3])
    batches = msgpack.unpackb(open(path, "rb").read())
    nc = await nats.connect(url)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for i, (subject, data) in enumerate(batches):
        await nc.publish(subject, data)
        if (i + 1) % sidecars == 0:  # one second of traffic: pace at 1 Hz per sidecar
            await nc.flush()
            elapsed = time.perf_counter() - start
            await asyncio.sleep(max(0, (i + 1) / sidecars - elapsed))
    await nc.flush()
    await nc.drain()
    print("done", flush=True)
asyncio.run(main())
"""


async def ingest_run(
    url: str, batches_file: Path, sidecars: int, total: int, mode: str
) -> dict[str, float]:
    state = GraphState()
    merged = refused = 0
    decode: Any = parse_batch if mode == "merge" else (lambda data: data)
    async with connect(url, name=f"bench-{mode}") as bus:
        ctx = bus.subscribe_decoded(
            subjects.TELEMETRY_ALL, decode, capacity=262144, overflow=Overflow.DROP_OLDEST
        )
        async with ctx as sub:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", PUBLISHER, url, str(batches_file), str(sidecars)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                assert proc.stdout is not None and proc.stdin is not None
                await proc.stdout.receive_some(100)  # "ready"
                cpu0, wall0 = time.process_time(), time.perf_counter()
                await proc.stdin.send_all(b"go\n")
                with trio.move_on_after(total / sidecars + 30):
                    async for d in sub:
                        if mode == "merge":
                            # The aggregator's sender check (actors/telemetry.py) too.
                            if from_sender(d.subject, d.body):
                                state.ingest(d.body, trio.current_time())
                            else:
                                refused += 1
                        else:
                            msgpack.unpackb(d.body, strict_map_key=False)
                        merged += 1
                        if merged >= total:
                            break
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            finally:
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        drops = sum(bus.stats.drops.values())
    return {"merged": merged, "cpu": cpu, "wall": wall, "drops": drops, "refused": refused}


def pure_merge(batches: list[tuple[str, bytes]]) -> float:
    state = GraphState()
    t = time.process_time()
    for i, (_, data) in enumerate(batches):
        state.ingest(parse_batch(data), 1000.0 + i / 10000)
    return len(batches) / (time.process_time() - t)


async def bench_ingest(sidecars: int, seconds: int) -> None:
    batches = make_batches(sidecars, seconds)
    size = sum(len(b) for _, b in batches) / len(batches)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batches.msgpack"
        path.write_bytes(msgpack.packb(batches))
        async with trio.open_nursery() as nursery:
            server: NatsServer = await nursery.start(
                NatsServer(NodeSpec("bench", Path(tmp) / "nats")).run
            )
            print(
                f"# (b) aggregator ingest: {sidecars} simulated sidecars at 1 Hz for {seconds} s, "
                f"{len(batches)} batches, {size:.0f} bytes each, 2 pairs per batch, real nats-server"
            )
            results = {}
            for mode in ("decode", "merge"):
                results[mode] = await ingest_run(server.url, path, sidecars, len(batches), mode)
            nursery.cancel_scope.cancel()
    for mode, label in (
        ("merge", "aggregator ingest (parse + merge)"),
        ("decode", "  ref: same subscription, msgpack decode only"),
    ):
        r = results[mode]
        rate = r["merged"] / r["cpu"] if r["cpu"] else 0.0
        print(
            f"{label:46s} {rate:9.0f} batches/CPU-s   ({r['merged']:.0f} merged in {r['wall']:.1f} s wall, "
            f"CPU {r['cpu'] / r['wall'] * 100:.0f}% of a core, {r['drops']:.0f} dropped, {r['refused']:.0f} refused)"
        )
    pure = pure_merge(batches)
    print(f"  ref: parse + merge alone, no NATS            {pure:9.0f} batches/CPU-s")
    m = results["merge"]
    cap = m["merged"] / m["cpu"] if m["cpu"] else 0.0
    print(
        f"  goal 10,000 sidecars at 1 Hz on one core: {'met' if cap >= 10000 else 'NOT met'} ({cap / 10000:.2f}x)"
    )


def _dataplane() -> Any:
    """bench/dataplane.py as a module (nginx, wrk and CPU helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_dataplane", Path(__file__).resolve().parent / "dataplane.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def bench_sidecar(
    rounds: int,
    seconds: float,
    conns: int,
    baseline: str | None = None,
    extra_variants: list[str] | None = None,
    two_hops: bool = False,
    pin: bool = True,
) -> None:
    import shutil
    import statistics

    print(
        f"# (c) request path through a real sidecar, 1 hop{' and 2 hops' if two_hops else ''}, "
        f"wrk -t1 -c{conns}, {rounds} rounds of {seconds:g} s (2 hops: CPU of both sidecars)"
    )
    help_text = subprocess.run(
        [sys.executable, "-m", "mesh", "sidecar", "--help"], capture_output=True, text=True
    ).stdout
    if "--no-telemetry" not in help_text:
        print("not measured: the sidecar does not call SidecarTelemetry yet (docs/telemetry.md)")
        return
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"not measured: {tool} not found (apt-get install -y wrk nginx)")
            return
    dp = _dataplane()
    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-tel-"))
    tmp.chmod(0o755)
    stack = dp.Stack(tmp)
    nats_proc = None
    sidecar_cpus = _pin_load_generators() if pin else None
    if sidecar_cpus:
        print(f"# sidecars pinned to CPU {sorted(sidecar_cpus)}; wrk, nginx and NATS to the others")
    try:
        upstream = stack.nginx()
        nats_port = dp.free_port()
        nats_proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "nats-server"),
                "-a",
                "127.0.0.1",
                "-p",
                str(nats_port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        dp.wait_port(nats_port)
        client_snap = dp.client_snapshot(upstream)
        variants: list[tuple[str, list[str], Path | None]] = [
            ("off", ["--no-telemetry"], None),
            ("on", ["--telemetry-nats", f"nats://127.0.0.1:{nats_port}"], None),
        ]
        for spec in extra_variants or ():  # NAME=ARGS: where the cost goes (e.g. no NATS)
            vname, _, vargs = spec.partition("=")
            variants.append((vname, [a.replace("{nats}", f"nats://127.0.0.1:{nats_port}")
                                     for a in vargs.split()], None))
        if baseline:  # the same two, as of an older revision (before/after in one run)
            src = stack.checkout(baseline)
            variants += [(f"{n}@{baseline}", extra, src) for n, extra, _ in variants]
        setups: dict[str, tuple[int, list[int]]] = {}
        for name, extra, src in variants:
            ports, pid = stack.sidecar(f"bench-{len(setups)}", 1, client_snap, tuple(extra), src)
            setups[name] = (ports["outbound"], [pid])
            if two_hops:  # client sidecar -> server sidecar (inbound) -> nginx
                server, server_pid = stack.sidecar(
                    "upstream", upstream, {"version": "bench"}, tuple(extra), src)
                client, client_pid = stack.sidecar(
                    f"bench-{len(setups)}", 1, dp.client_snapshot(server["inbound"]),
                    tuple(extra), src)
                setups[name + " 2hop"] = (client["outbound"], [client_pid, server_pid])
        if sidecar_cpus:
            for _, pids in setups.values():
                for pid in pids:
                    _pin(pid, sidecar_cpus)
        for port, pids in setups.values():
            dp.run_wrk(port, conns, 1, pids)  # warm up
        samples: dict[str, list[Any]] = {name: [] for name in setups}
        for _ in range(rounds):
            for name, (port, pids) in setups.items():
                samples[name].append(dp.run_wrk(port, conns, seconds, pids))
        med = {
            n: (
                statistics.median(p.rps for p in pts),
                statistics.median(p.cpu_us_per_req for p in pts),
                statistics.median(p.p50 for p in pts),
            )
            for n, pts in samples.items()
        }
        for n in setups:
            rps, cpu, p50 = med[n]
            print(
                f"telemetry {n:14s}  {rps:9.0f} rps   sidecar CPU {cpu:6.1f} µs/req   p50 {p50:6.0f} µs"
            )
        for suffix in [s + h for s in (("", f"@{baseline}") if baseline else ("",))
                       for h in (("", " 2hop") if two_hops else ("",))]:
            on, off = med["on" + suffix], med["off" + suffix]
            loss = 1 - on[0] / off[0]
            cpu_loss = 1 - off[1] / on[1]
            # Rounds visit on and off back to back: each round's pair is one comparison.
            losses = sorted(
                1 - a.rps / b.rps
                for a, b in zip(samples["on" + suffix], samples["off" + suffix], strict=True)
            )
            print(
                f"  {suffix.strip() or 'this tree'}: rps loss with telemetry on: {loss * 100:.1f}% "
                f"(rounds: {losses[0] * 100:.1f} .. {losses[-1] * 100:.1f}%), requests per "
                f"CPU-second: -{cpu_loss * 100:.1f}% (CPU +{on[1] - off[1]:.1f} µs/req); "
                f"goal <= 10%: {'met' if loss <= 0.10 else 'NOT met'}"
            )
    finally:
        stack.close()
        if nats_proc is not None:
            nats_proc.terminate()
            nats_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _pin_load_generators() -> set[int] | None:
    """Give the sidecars one CPU and everything else (this process, so the wrk, nginx and
    NATS it starts) the others: the load generators then do not take turns with the
    sidecar on its CPU, which made rounds differ by several percent. None: one CPU."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, set(cpus[1:]))
    return {cpus[0]}


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (sched_setaffinity on a pid moves one thread only)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), cpus)


def yaml_dump(obj: Any) -> str:
    import yaml

    text: str = yaml.safe_dump(obj)
    return text


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=300_000)
    p.add_argument("--sidecars", type=int, default=10_000)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-sidecar", action="store_true")
    p.add_argument("--rounds", type=int, default=7, help="rounds for (c)")
    p.add_argument("--point-seconds", type=float, default=3.0, help="seconds per wrk run in (c)")
    p.add_argument("--baseline", metavar="REV", help="(c) also for the sidecar as of git REV")
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME=ARGS",
        help="(c) also a sidecar with these extra arguments ({nats}: the bench's NATS URL)",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="(c) do not give the sidecars a CPU of their own",
    )
    p.add_argument(
        "--two-hops",
        action="store_true",
        help="(c) also client sidecar -> server sidecar -> nginx: the inbound hop, which "
        "receives a traceparent and an x-request-id",
    )
    args = p.parse_args()
    bench_request_path(args.calls)
    if not args.skip_ingest:
        trio.run(bench_ingest, args.sidecars, args.seconds)
    if not args.skip_sidecar:
        bench_sidecar(
            args.rounds, args.point_seconds, 16, args.baseline, args.variant, args.two_hops,
            not args.no_pin,
        )
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
