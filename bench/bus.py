"""Bus benchmark: the trio bus next to raw nats-py on plain asyncio, in the same run.

    .venv/bin/python bench/bus.py [--messages 200000] [--requests 2000] [--rounds 2]

Starts its own nats-server on loopback and an echo responder (plain nats-py,
shared by both clients so only the client side differs). Prints publish
throughput (200-byte messages, each one an awaited publish call, then a flush)
and request/reply latency, with ratios against the raw nats-py reference.
Goals (issue 2): publish >= 50% of raw, request p50 <= 2x raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is named bus.py, like the package it measures: drop its folder from
# the import path so `import bus` finds the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PAYLOAD = b"x" * 200
ECHO = "bench.echo"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the reference: plain asyncio nats-py, run in a child process ----------


async def _reference(url: str, messages: int, requests: int, budget: float) -> dict[str, float]:
    import nats

    nc = await nats.connect(url)
    sent = 0
    start = time.perf_counter()
    deadline = start + budget
    for sent in range(1, messages + 1):
        await nc.publish("bench.pub", PAYLOAD)
        if sent % 10000 == 0 and time.perf_counter() > deadline:
            break
    await nc.flush()
    pub_rate = sent / (time.perf_counter() - start)
    lat = []
    for _ in range(requests):
        t = time.perf_counter()
        await nc.request(ECHO, PAYLOAD, timeout=5)
        lat.append(time.perf_counter() - t)
    await nc.drain()
    return {
        "publish_per_s": pub_rate,
        "req_p50_ms": percentile(lat, 0.5) * 1e3,
        "req_p99_ms": percentile(lat, 0.99) * 1e3,
    }


async def _echo(url: str) -> None:
    import nats

    nc = await nats.connect(url)

    async def reply(msg: object) -> None:
        await nc.publish(msg.reply, msg.data)  # type: ignore[attr-defined]

    await nc.subscribe(ECHO, cb=reply)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- the trio bus ------------------------------------------------------------


async def _trio_bus(url: str, messages: int, requests: int, budget: float) -> dict[str, float]:

    from bus.client import connect
    from bus.errors import BusOverloaded

    async with connect(url) as bus:
        sent = 0
        start = time.perf_counter()
        deadline = start + budget
        for sent in range(1, messages + 1):
            await bus.publish("bench.pub", PAYLOAD)
            if sent % 10000 == 0 and time.perf_counter() > deadline:
                break
        await bus.flush()
        pub_rate = sent / (time.perf_counter() - start)

        start = time.perf_counter()
        for _ in range(messages):
            try:
                bus.publish_nowait("bench.pub", PAYLOAD)
            except BusOverloaded:  # outbox full: wait for the flusher, as a real caller would
                await bus.publish("bench.pub", PAYLOAD)
        await bus.flush()
        nowait_rate = messages / (time.perf_counter() - start)

        lat = []
        for _ in range(requests):
            t = time.perf_counter()
            await bus.request_raw(ECHO, PAYLOAD, timeout=5)
            lat.append(time.perf_counter() - t)
    return {
        "publish_per_s": pub_rate,
        "publish_nowait_per_s": nowait_rate,
        "req_p50_ms": percentile(lat, 0.5) * 1e3,
        "req_p99_ms": percentile(lat, 0.99) * 1e3,
    }


def run_child(mode: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--url",
            url,
            "--messages",
            str(args.messages),
            "--requests",
            str(args.requests),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=10.0, help="max seconds per publish run")
    ap.add_argument("--child", choices=["reference", "trio", "echo"])
    ap.add_argument("--url")
    args = ap.parse_args()

    if args.child == "echo":
        asyncio.run(_echo(args.url))
        return
    if args.child == "reference":
        print(
            json.dumps(asyncio.run(_reference(args.url, args.messages, args.requests, args.budget)))
        )
        return
    if args.child == "trio":
        import trio

        print(json.dumps(trio.run(_trio_bus, args.url, args.messages, args.requests, args.budget)))
        return

    import trio

    from bus.server import NatsServer, NodeSpec
    from mesh.processes import child_kwargs, terminate

    async def orchestrate() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with trio.open_nursery() as nursery:
                server: NatsServer = await nursery.start(
                    NatsServer(NodeSpec("bench", Path(tmp))).run
                )
                echo = await trio.lowlevel.open_process(
                    [sys.executable, __file__, "--child", "echo", "--url", server.url],
                    stdout=subprocess.PIPE,
                    **child_kwargs(),
                )
                try:
                    assert echo.stdout is not None
                    await echo.stdout.receive_some(100)  # "ready"
                    results: dict[str, list[dict[str, float]]] = {"reference": [], "trio": []}
                    for _ in range(args.rounds):  # alternate so drift hits both sides alike
                        for mode in ("reference", "trio"):
                            results[mode].append(
                                await trio.to_thread.run_sync(run_child, mode, server.url, args)
                            )
                finally:
                    await terminate(echo)
                report(results, args)
                nursery.cancel_scope.cancel()

    trio.run(orchestrate)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    ref_pub, bus_pub = med("reference", "publish_per_s"), med("trio", "publish_per_s")
    bus_nowait = med("trio", "publish_nowait_per_s")
    ref_p50, bus_p50 = med("reference", "req_p50_ms"), med("trio", "req_p50_ms")
    ref_p99, bus_p99 = med("reference", "req_p99_ms"), med("trio", "req_p99_ms")
    print(
        f"bus benchmark: {args.messages} x 200 B publishes, {args.requests} requests, "
        f"median of {args.rounds} rounds, one nats-server on loopback"
    )
    print(f"{'':28}{'raw nats-py':>14}{'trio bus':>14}{'ratio':>10}")
    print(
        f"{'publish (awaited), msg/s':28}{ref_pub:>14,.0f}{bus_pub:>14,.0f}{bus_pub / ref_pub:>9.2f}x"
    )
    print(f"{'publish_nowait, msg/s':28}{'':>14}{bus_nowait:>14,.0f}{bus_nowait / ref_pub:>9.2f}x")
    print(f"{'request p50, ms':28}{ref_p50:>14.3f}{bus_p50:>14.3f}{bus_p50 / ref_p50:>9.2f}x")
    print(f"{'request p99, ms':28}{ref_p99:>14.3f}{bus_p99:>14.3f}{bus_p99 / ref_p99:>9.2f}x")
    ok_pub = bus_pub / ref_pub >= 0.5
    ok_req = bus_p50 / ref_p50 <= 2.0
    print(
        f"goals: publish >= 0.5x raw: {'met' if ok_pub else 'NOT met'}; "
        f"request p50 <= 2x raw: {'met' if ok_req else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
