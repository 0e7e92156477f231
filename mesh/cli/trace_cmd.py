"""`mesh trace TRACE_ID`: the spans of one request's path, as a tree."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from bus import subjects
from bus.client import connect
from bus.errors import BusTimeout, NoResponders
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import BusError, ConfigError
from mesh.messages import TraceQuery, TraceReply


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "trace", help="show the spans of one trace (ids from traceparent or access logs)"
    )
    add_nats_flag(p)
    p.add_argument("trace_id", help="32 hex digits, or a whole traceparent header")
    p.add_argument("--json", action="store_true", help="one JSON object with the spans")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for an answer")
    p.set_defaults(func=cmd_trace)


def trace_id_of(text: str) -> str:
    text = text.strip().lower()
    m = re.fullmatch(r"(?:[0-9a-f]{2}-)?([0-9a-f]{32})(?:-[0-9a-f]{16}-[0-9a-f]{2})?", text)
    if m is None:
        raise ConfigError(f"{text!r} is not a trace id: expected 32 hex digits or a traceparent")
    return m.group(1)


def render(trace_id: str, spans: list[dict[str, Any]]) -> str:
    if not spans:
        return f"trace {trace_id}: no spans (not sampled, not yet shipped, or expired)"
    ids = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in ids else ""
        children.setdefault(parent, []).append(s)
    t0 = min(s["start_ns"] for s in spans)
    lines = [f"trace {trace_id}: {len(spans)} spans"]

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x["start_ns"]):
            ms = (s["end_ns"] - s["start_ns"]) / 1e6
            at = (s["start_ns"] - t0) / 1e6
            status = s["attrs"].get("http.response.status_code", "")
            mark = " ERROR" if s["error"] else ""
            lines.append(
                f"{'  ' * depth}{s['service']}: {s['name']}  +{at:.2f}ms  {ms:.2f}ms  "
                f"{status}{mark}  span {s['span_id']}"
            )
            walk(s["span_id"], depth + 1)

    walk("", 1)
    return "\n".join(lines)


def cmd_trace(args: argparse.Namespace) -> int:
    trace_id = trace_id_of(args.trace_id)

    async def main() -> int:
        async with connect(args.nats, name="mesh-trace", connect_timeout=3.0) as bus:
            try:
                reply = await bus.request(
                    subjects.TRACE_QUERY,
                    TraceQuery(trace_id=trace_id),
                    TraceReply,
                    timeout=args.timeout,
                )
            except (NoResponders, BusTimeout):
                raise BusError(
                    f"no telemetry aggregator answered on {subjects.TRACE_QUERY}: "
                    "is the control plane running (`mesh up`)?"
                ) from None
        if args.json:
            print(json.dumps({"trace_id": trace_id, "spans": reply.spans}))
        else:
            print(render(trace_id, reply.spans))
        return 0 if reply.spans else 1

    return run_trio(main)
