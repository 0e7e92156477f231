"""The sidecar's request path in pure Python: the real proxy loop on fake in-memory I/O.

No sockets, no syscalls, no waits: a fake client hands `HttpProxy._serve` the same GET
again and again and a fake pooled upstream answers with an nginx-like 1 KB response, so
what is timed is parsing, routing, retries bookkeeping, header rewriting, pooling and
telemetry, i.e. what a code change to the proxy can move. Process CPU time, best of
`--repeat`, so that other work on the machine disturbs it less than wall time would.

    .venv/bin/python bench/proxy_path.py [--requests 20000] [--repeat 5]
    PYTHONPATH=/path/to/old/tree .venv/bin/python bench/proxy_path.py   # an older tree
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

# bench/ holds bus.py, which would shadow the `bus` package: drop this folder from the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import trio  # noqa: E402

from mesh.snapshot import Endpoint, Snapshot  # noqa: E402
from sidecar.http.codec import RequestReader  # noqa: E402
from sidecar.pool import Pool, UpstreamConn  # noqa: E402
from sidecar.proxy import HttpProxy, _Downstream  # noqa: E402
from sidecar.runtime import Runtime  # noqa: E402
from sidecar.stats import Stats  # noqa: E402
from sidecar.telemetry import SidecarTelemetry, TelemetryOptions  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: upstream\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 07:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Thu, 26 Nov 2026 06:00:00 GMT\r\nConnection: keep-alive\r\n"
            b"ETag: \"abc-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + b"x" * 1024)


class FakeClient:
    """Sends REQUEST `n` times, then closes; swallows the responses."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.n == 0:
            return b""
        self.n -= 1
        return REQUEST

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pass


class FakeUpstream:
    """Answers every request with RESPONSE at once."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return RESPONSE

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        pass


def _snapshot() -> dict[str, object]:
    """bench/dataplane.py's client snapshot: routing and retries on."""
    spec = importlib.util.spec_from_file_location(
        "bench_dataplane", Path(__file__).resolve().parent / "dataplane.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    snap: dict[str, object] = module.client_snapshot(9)
    return snap


async def per_request_us(n: int, telemetry: bool) -> float:
    rng = random.Random(1)
    rt = Runtime(Snapshot.from_dict(_snapshot()), 1, rng, time.monotonic)
    pool = Pool()
    tel = SidecarTelemetry("bench", "bench-1", TelemetryOptions()) if telemetry else None
    proxy = HttpProxy("outbound", lambda: rt, pool, Stats(), "bench", rng, tel)
    ep = Endpoint("127.0.0.1", 9)
    cluster = rt.clusters["upstream"]
    conn = UpstreamConn(FakeUpstream(), ep, cluster.breaker)  # type: ignore[arg-type]
    if hasattr(conn, "idle_list"):  # older trees have no per-connection idle list
        conn.idle_list = pool._idle.setdefault(ep, [])
    cluster.breaker.open_connections += 1
    pool.release(conn, 0)
    c = _Downstream(FakeClient(n), RequestReader(),  # type: ignore[arg-type]
                    trio.CancelScope(deadline=trio.current_time() + 3600))
    start = time.process_time()
    with c.scope:
        await proxy._serve(c)
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import sidecar

    print(f"# proxy request path on fake I/O, {args.requests} requests, best of {args.repeat}, "
          f"code from {Path(sidecar.__file__).parent}")
    for telemetry in (False, True):
        best = min(trio.run(per_request_us, args.requests, telemetry)
                   for _ in range(args.repeat))
        print(f"telemetry {'on ' if telemetry else 'off'}  {best:6.2f} us CPU per request")


if __name__ == "__main__":
    main()
