"""Shared helpers for telemetry tests: simulated sidecar traffic, tiny HTTP GET."""

from __future__ import annotations

import trio

from sidecar.telemetry import Recorder

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


async def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode()
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
