"""A bounded HTTP/1.1 load generator: N keep-alive connections, capped in count and time.

It reads responses just well enough to count them (status, Content-Length or
chunked bodies, the mesh's `x-mesh-flags`), and it always stops: after
`requests` requests or `duration` seconds, whichever comes first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import ceil

import trio


class LoadError(Exception):
    pass


@dataclass
class LoadResult:
    sent: int = 0
    elapsed: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    flags: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def ok(self) -> int:
        """Answers that are neither a client nor a server error (the exit status of `mesh load`)."""
        return sum(n for code, n in self.statuses.items() if code < 400)

    def summary(self) -> dict[str, object]:
        return {
            "requests": self.sent,
            "seconds": round(self.elapsed, 3),
            "rps": round(self.sent / self.elapsed, 1) if self.elapsed else 0.0,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "flags": dict(self.flags),
            "errors": dict(self.errors),
            "p50_ms": round(self.quantile(0.5) * 1e3, 3),
            "p90_ms": round(self.quantile(0.9) * 1e3, 3),
            "p99_ms": round(self.quantile(0.99) * 1e3, 3),
        }


class _Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise LoadError("connection closed by the server")
        self.buf += chunk

    async def read_until(self, marker: bytes) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            if len(self.buf) > 1 << 20:
                raise LoadError("response head over 1 MiB")
            await self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + len(marker)]
        return out

    async def read_exact(self, n: int) -> None:
        while len(self.buf) < n:
            await self._fill()
        del self.buf[:n]

    async def response(self, head_request: bool) -> tuple[int, dict[str, str], bool]:
        head = (await self.read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        try:
            status = int(head[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise LoadError(f"not an HTTP response: {head[0][:60]!r}") from None
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close"
        if head_request or status in (204, 304) or 100 <= status < 200:
            return status, headers, keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                chunk_line = await self.read_until(b"\r\n")
                try:
                    size = int(chunk_line.split(b";")[0], 16)
                except ValueError:
                    raise LoadError(f"bad chunk size {chunk_line[:20]!r}") from None
                if size == 0:
                    await self.read_until(b"\r\n")  # no trailers expected
                    break
                await self.read_exact(size + 2)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise LoadError(f"bad Content-Length {headers['content-length'][:20]!r}") from None
            await self.read_exact(length)
        else:  # body until close
            while True:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    break
            keep = False
        return status, headers, keep


async def run_load(
    host: str,
    port: int,
    *,
    path: str = "/",
    authority: str | None = None,
    headers: dict[str, str] | None = None,
    connections: int = 4,
    requests: int = 1000,
    duration: float = 30.0,
    rate: float | None = None,
) -> LoadResult:
    """Send up to `requests` GETs over `connections` connections for at most `duration` s."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    request = f"GET {path} HTTP/1.1\r\nHost: {authority or host}\r\n{extra}\r\n".encode()
    result = LoadResult()
    budget = requests
    interval = connections / rate if rate else 0.0

    async def worker() -> None:
        nonlocal budget
        conn: _Conn | None = None
        next_at = trio.current_time()
        while budget > 0:
            budget -= 1
            if interval:
                next_at += interval
                await trio.sleep_until(next_at)
            start = trio.current_time()
            try:
                if conn is None:
                    conn = _Conn(await trio.open_tcp_stream(host, port))
                await conn.stream.send_all(request)
                status, resp_headers, keep = await conn.response(False)
            except (OSError, trio.BrokenResourceError, LoadError) as exc:
                result.errors[type(exc).__name__] += 1
                result.sent += 1
                if conn is not None:
                    await conn.stream.aclose()
                conn = None
                await trio.sleep(0.01)  # a refused connection must not spin
                continue
            result.sent += 1
            result.latencies.append(trio.current_time() - start)
            result.statuses[status] += 1
            if resp_headers.get("x-mesh-flags"):
                result.flags[resp_headers["x-mesh-flags"]] += 1
            if not keep:
                await conn.stream.aclose()
                conn = None
        if conn is not None:
            await conn.stream.aclose()

    start = trio.current_time()
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, connections)):
                nursery.start_soon(worker)
    result.elapsed = trio.current_time() - start
    return result


# The gentle load `mesh up --demo` keeps running so `mesh top` and the dashboard show every
# edge from the start: a few requests per second, one connection, capped in count and time
# like any load here (a demo left running overnight stops loading after the cap).
# 10/s: the demo's 5% canary then calls ratings ~0.5/s, so the catalog -> ratings row is in
# all but ~0.6% of `mesh top`'s 10 s windows (at 5/s it would be missing from ~8% of them).
DEFAULT_BACKGROUND_RATE = 10.0  # requests per second
DEFAULT_BACKGROUND_DURATION = 3600.0  # seconds


async def background_load(
    host: str,
    port: int,
    *,
    rate: float = DEFAULT_BACKGROUND_RATE,
    duration: float = DEFAULT_BACKGROUND_DURATION,
) -> LoadResult:
    """`rate` GETs per second to http://host:port/ for at most `duration` seconds."""
    return await run_load(
        host,
        port,
        connections=1,
        requests=max(1, ceil(rate * duration)),
        duration=duration,
        rate=rate,
    )
