"""Access logs: one JSON object per request, to a file or stdout, optionally on NATS.

The request path calls `AccessLog.record(...)`, which only keeps the fields (no
formatting, no I/O); the `run` task formats and writes them every
`flush_interval` seconds and, when a bus is given, publishes each entry as an
`accesslog` message on ``mesh.accesslog.<service>``. Fields (docs/telemetry.md):

start_time (RFC 3339 UTC, ms), method, path, authority, protocol, status,
response_flags, duration_ms, upstream (endpoint host:port, "" if none),
source (peer identity or service), request_id, trace_id, rx_bytes, tx_bytes.
"""

from __future__ import annotations

import json
import json.encoder
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import trio

from bus import subjects
from bus.client import Bus
from mesh.errors import ConfigError, MeshError
from mesh.messages import AccessLogEntry

log = logging.getLogger("mesh.sidecar.accesslog")

FIELDS = (
    "start_time",
    "method",
    "path",
    "authority",
    "protocol",
    "status",
    "response_flags",
    "duration_ms",
    "upstream",
    "source",
    "request_id",
    "trace_id",
    "rx_bytes",
    "tx_bytes",
)
MAX_BUFFERED = 100_000
# JSON string quoting (C-accelerated in CPython), used instead of json.dumps for speed.
_s: Callable[[str], str] = json.encoder.encode_basestring_ascii


_second_cache: list[Any] = [None, ""]


def rfc3339(unix_s: float) -> str:
    """RFC 3339 UTC with milliseconds; the formatted second is cached (one strftime a second)."""
    sec = int(unix_s // 1)
    if _second_cache[0] != sec:
        _second_cache[0] = sec
        _second_cache[1] = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    ms = min(999, int((unix_s - sec) * 1000))  # truncated, like isoformat()
    return f"{_second_cache[1]}.{ms:03d}Z"


def entry(
    *,
    start_time: float,
    method: str,
    path: str,
    authority: str,
    status: int,
    response_flags: str,
    duration: float,
    upstream: str = "",
    source: str = "",
    request_id: str = "",
    trace_id: str = "",
    rx_bytes: int = 0,
    tx_bytes: int = 0,
    protocol: str = "HTTP/1.1",
) -> dict[str, Any]:
    """The access-log record, with FIELDS in order. `start_time` is unix seconds."""
    return {
        "start_time": rfc3339(start_time),
        "method": method,
        "path": path,
        "authority": authority,
        "protocol": protocol,
        "status": status,
        "response_flags": response_flags,
        "duration_ms": round(duration * 1000, 3),
        "upstream": upstream,
        "source": source,
        "request_id": request_id,
        "trace_id": trace_id,
        "rx_bytes": rx_bytes,
        "tx_bytes": tx_bytes,
    }


def format_line(record: dict[str, Any]) -> str:
    """One JSON line; the same text `json.dumps(record, separators=(",", ":"))` gives."""
    r = record
    return (
        f'{{"start_time":"{r["start_time"]}","method":{_s(r["method"])},"path":{_s(r["path"])},'
        f'"authority":{_s(r["authority"])},"protocol":{_s(r["protocol"])},'
        f'"status":{int(r["status"])},"response_flags":{_s(r["response_flags"])},'
        f'"duration_ms":{float(r["duration_ms"])!r},"upstream":{_s(r["upstream"])},'
        f'"source":{_s(r["source"])},"request_id":{_s(r["request_id"])},'
        f'"trace_id":{_s(r["trace_id"])},"rx_bytes":{int(r["rx_bytes"])},'
        f'"tx_bytes":{int(r["tx_bytes"])}}}\n'
    )


class AccessLog:
    """Buffered JSON-lines writer. `target`: a path, "-" for stdout, or an open text file."""

    def __init__(
        self,
        target: str | Path | TextIO,
        *,
        service: str = "",
        bus: Bus | None = None,
        flush_interval: float = 0.2,
    ) -> None:
        self._own = False
        if isinstance(target, (str, Path)):
            if str(target) == "-":
                self.file: TextIO = sys.stdout
            else:
                try:
                    self.file = open(target, "a", encoding="utf-8")  # closed in close()
                except OSError as exc:
                    raise ConfigError(f"cannot open access log {target}: {exc.strerror}") from None
                self._own = True
        else:
            self.file = target
        self.subject = subjects.accesslog(service) if service else ""
        if bus is not None and not service:
            raise ConfigError("publishing access-log entries needs the service name")
        self.bus = bus
        self.flush_interval = flush_interval
        self._pending: list[dict[str, Any]] = []  # record()'s fields, formatted by flush()
        self.dropped = 0
        self.written = 0

    def record(self, **fields: Any) -> None:
        """Keep one request's fields (keywords of `entry`): the next flush formats and
        writes the line, off the request path (formatting costs ~3 us a line)."""
        if len(self._pending) >= MAX_BUFFERED:
            self.dropped += 1
            return
        self._pending.append(fields)

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        entries = [entry(**fields) for fields in pending]
        lines = [format_line(rec) for rec in entries]
        if not (self.bus is not None and self.subject):
            entries = []
        if lines:
            try:
                self.file.write("".join(lines))
                self.file.flush()
                self.written += len(lines)
            except OSError as exc:
                self.dropped += len(lines)
                log.warning("access log write failed: %s", exc)
        if self.bus is not None and self.subject:
            for rec in entries:
                try:
                    self.bus.publish_nowait(self.subject, AccessLogEntry(entry=rec))
                except (MeshError, trio.ClosedResourceError) as exc:
                    self.dropped += 1
                    log.debug("access log entry not published: %s", exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_interval)
                self.flush()
        finally:
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._own:
            self.file.close()
