"""Shared helpers for telemetry tests: simulated sidecar traffic, tiny HTTP GET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from sidecar.telemetry import Recorder

MESH = [sys.executable, "-m", "mesh"]

# A 3-service chain: (src, dst, ver, requests, errors)
CHAIN = [
    ("frontend", "backend", "v1", 100, 10),
    ("backend", "db", "v2", 50, 0),
]


def simulate(recorders: dict[str, Recorder], scale: int = 1) -> None:
    """Record the CHAIN's traffic (`scale` times) on each source's recorder."""
    for src, dst, ver, n, errors in CHAIN:
        for _ in range(scale):
            for i in range(n):
                code = 503 if i < errors else 200
                recorders[src].record(src, dst, ver, code, "", 0.002 + i * 1e-5, 100, 200)


async def http_get(port: int, path: str, authority: str = "127.0.0.1") -> tuple[int, bytes]:
    """GET on 127.0.0.1:port with this Host header, connection: close."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, matched by name and exact labels."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def count_samples(text: str, name: str, **labels: str) -> int:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        1
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@asynccontextmanager
async def process(
    argv: list[str], env: dict[str, str] | None = None
) -> AsyncIterator[trio.Process]:
    proc = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(5):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for s in (proc.stdout, proc.stderr):
                if s is not None:
                    await s.aclose()


async def read_json_line(proc: trio.Process, key: str, timeout: float = 20) -> dict[str, Any]:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    obj: dict[str, Any] = json.loads(line)
                    if key in obj:
                        return obj
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                err: bytes | bytearray = b""
                if proc.stderr is not None:
                    with trio.move_on_after(1):
                        err = await proc.stderr.receive_some(65536)
                raise AssertionError(f"process exited: {buf.decode()} {err.decode()}")
            buf += chunk


async def mesh(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*MESH, *args], capture_stdout=True, capture_stderr=True, check=False
        )
