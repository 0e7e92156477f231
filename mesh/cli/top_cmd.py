"""`mesh top`: a live table of golden signals per service pair (like `linkerd viz stat`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from actors.telemetry import query_graph
from bus.client import connect
from mesh.cli.common import add_nats_flag, run_trio
from mesh.messages import GraphReply
from mesh.stats_window import WINDOWS

# SUCCESS is what callers saw; TRIES what the tries did, retried ones included (lower when
# retries hide failures), with RETRIES the retries sent in the window.
COLUMNS = ("SRC", "DST", "RPS", "SUCCESS", "TRIES", "RETRIES", "REQUESTS", "P50", "P90", "P99")
# Opaque TCP edges (protocol "tcp") have no requests; they get their own table:
# connections opened per second and in the window, bytes per second each way, refusals.
TCP_COLUMNS = ("SRC", "DST", "CONN/S", "CONNS", "SENT/S", "RECEIVED/S", "DENIED")


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "top", help="live golden signals per service pair (rate, success, latency)"
    )
    add_nats_flag(p)
    p.add_argument(
        "--window", choices=list(WINDOWS), default="10s", help="sliding window (default 10s)"
    )
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    p.set_defaults(func=cmd_top)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms" if v < 100 else f"{v:.0f}ms"


def _bytes(v: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}B"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]


def render(reply: GraphReply) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS]
    tcp_rows: list[tuple[str, ...]] = [TCP_COLUMNS]
    for e in reply.edges:
        if e.get("protocol") == "tcp":
            tcp_rows.append(
                (
                    e["src"],
                    e["dst"],
                    f"{e['tcp_cps']:.1f}",
                    str(e["tcp_connections"]),
                    _bytes(e["tcp_sent_bps"]),
                    _bytes(e["tcp_received_bps"]),
                    str(e["tcp_denied"]),
                )
            )
            continue
        rows.append(
            (
                e["src"],
                e["dst"],
                f"{e['rps']:.1f}",
                f"{e['success_rate'] * 100:.2f}%",
                f"{e.get('actual_success_rate', e['success_rate']) * 100:.2f}%",
                str(e.get("retries", 0)),
                str(e["requests"]),
                _ms(e["p50_ms"]),
                _ms(e["p90_ms"]),
                _ms(e["p99_ms"]),
            )
        )
    lines = _table(rows)
    if len(tcp_rows) > 1:
        lines += ["", *_table(tcp_rows)]
    if not reply.edges:
        lines.append(f"(no traffic in the last {reply.window})")
    lines.append(
        f"window {reply.window}, from aggregator {reply.replica} (merging for {reply.covered_s:.0f} s)"
    )
    return "\n".join(lines)


def as_json(reply: GraphReply) -> str:
    return json.dumps(
        {
            "window": reply.window,
            "replica": reply.replica,
            "ts": reply.ts,
            "nodes": reply.nodes,
            "edges": reply.edges,
            "ingest": reply.ingest,
            "covered_s": reply.covered_s,
        }
    )


def cmd_top(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-top", connect_timeout=3.0) as bus:
            while True:
                reply = await query_graph(bus, args.window, timeout=args.timeout)
                if args.json:
                    print(as_json(reply), flush=True)
                elif args.once:
                    print(render(reply), flush=True)
                else:
                    sys.stdout.write("\x1b[H\x1b[2J" + render(reply) + "\n")
                    sys.stdout.flush()
                if args.once:
                    return 0
                await trio.sleep(args.interval)

    return run_trio(main)
