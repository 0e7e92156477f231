"""A minimal HTTP GET over trio for nats-server's monitoring endpoints.

Only used against our own nats-server children on loopback, so it speaks just
enough HTTP/1.0 (connection close, whole body) and needs no client library.
"""

from __future__ import annotations

import json
from typing import Any

import trio


class ProbeError(Exception):
    pass


async def http_get(
    host: str, port: int, path: str, *, limit: int = 4 * 1024 * 1024
) -> tuple[int, bytes]:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise ProbeError(f"cannot connect to {host}:{port}: {exc}") from None
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError as exc:
                raise ProbeError(f"{host}:{port}{path}: {exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ProbeError(f"{host}:{port}{path}: response over {limit} bytes")
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ProbeError(f"{host}:{port}{path}: not an HTTP response") from None
    return status, body


async def http_get_json(host: str, port: int, path: str) -> tuple[int, Any]:
    status, body = await http_get(host, port, path)
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        raise ProbeError(f"{host}:{port}{path}: body is not JSON") from None
