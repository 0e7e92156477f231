"""A consumer written only from docs/telemetry.md: plain asyncio nats-py + msgpack.

Usage: raw_nats_subscriber.py NATS_URL BATCHES. Prints {"ready": true}, then one JSON
object with per-pair totals after BATCHES telemetry batches.
"""

import asyncio
import json
import sys
from typing import Any

import msgpack
import nats


async def main(url: str, want: int) -> None:
    nc = await nats.connect(url)
    totals: dict[str, dict[str, int]] = {}
    got = asyncio.Event()
    seen = 0

    async def on_msg(msg: Any) -> None:
        nonlocal seen
        # Envelope: {"t": type, "v": version, "b": body}; map keys may be integers.
        env = msgpack.unpackb(msg.data, raw=False, strict_map_key=False)
        assert env["t"] == "telemetry.batch" and env["v"] == 1
        body = env["b"]
        assert body["schema"] == 1
        _, _, ns, svc, inst = msg.subject.split(".")
        assert (ns, svc, inst) == (body["ns"], body["svc"], body["inst"])
        base, growth = body["hist"]["base"], body["hist"]["growth_log2"]
        for row in body["pairs"]:
            key = f"{row['src']}->{row['dst']}"
            t = totals.setdefault(key, {"n": 0, "err": 0, "5xx": 0, "lat_count": 0})
            t["n"] += row["n"]
            t["err"] += row["err"]
            t["5xx"] += row["codes"][5]
            t["lat_count"] += sum(row["lat"].values())
            # Upper bound of the slowest bucket seen, from the documented formula.
            top = max(row["lat"])
            t["max_le_us"] = round(base * 2 ** (top * growth) * 1e6)
        seen += 1
        if seen >= want:
            got.set()

    await nc.subscribe("mesh.telemetry.>", cb=on_msg)
    await nc.flush()
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.wait_for(got.wait(), 20)
    print(json.dumps({"batches": seen, "pairs": totals}), flush=True)
    await nc.drain()


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
