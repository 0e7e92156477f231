"""`mesh load`: a bounded HTTP load generator, e.g. for the demo's ingress."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import urlsplit

from deploy.load import run_load
from mesh.cli.common import run_trio
from mesh.errors import ConfigError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "load", help="send a bounded HTTP load (count and time capped) and summarise the answers"
    )
    p.add_argument(
        "url", nargs="?", default="http://127.0.0.1:8080/", help="default: the demo ingress"
    )
    p.add_argument(
        "-c", "--connections", type=int, default=4, help="keep-alive connections (default 4)"
    )
    p.add_argument(
        "-n", "--requests", type=int, default=1000, help="at most this many requests (default 1000)"
    )
    p.add_argument(
        "-d", "--duration", type=float, default=30.0, help="at most this many seconds (default 30)"
    )
    p.add_argument(
        "--rate", type=float, help="requests per second in all (default: as fast as answered)"
    )
    p.add_argument("-H", "--header", action="append", default=[], help="extra header 'name: value'")
    p.add_argument("--host", help="Host header (default: from the URL)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_load)


def cmd_load(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    if url.scheme != "http" or not url.hostname:
        raise ConfigError(f"{args.url!r}: expected http://HOST[:PORT]/PATH")
    headers = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {h!r}: expected 'name: value'")
        headers[name.strip()] = value.strip()
    for flag in ("connections", "requests"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    if not 0 < args.duration <= 3600:
        raise ConfigError("--duration must be between 0 and 3600 seconds")

    async def main() -> int:
        result = await run_load(
            url.hostname or "127.0.0.1",
            url.port or 80,
            path=(url.path or "/") + (f"?{url.query}" if url.query else ""),
            authority=args.host,
            headers=headers,
            connections=args.connections,
            requests=args.requests,
            duration=args.duration,
            rate=args.rate,
        )
        s = result.summary()
        if args.json:
            print(json.dumps(s))
        else:
            print(
                f"{s['requests']} requests in {s['seconds']} s ({s['rps']} rps); "
                f"p50 {s['p50_ms']} ms, p90 {s['p90_ms']} ms, p99 {s['p99_ms']} ms"
            )
            print(
                f"  statuses: {s['statuses']}  mesh flags: {s['flags'] or 'none'}  errors: {s['errors'] or 'none'}"
            )
        return 0 if result.ok == result.sent else 1

    return run_trio(main)
