"""Helpers for sidecar tests: real app processes, real `mesh sidecar` processes.

Every process started here is killed in teardown; readiness is learned from the one
JSON line each process prints, never from a sleep.
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent
PYTHON = sys.executable
MESH = [str(Path(sys.executable).parent / "mesh")]


def read_json_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> dict[str, Any]:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not sel.select(left):
            raise TimeoutError(f"no ready line from {proc.args!r} in {timeout}s")
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{proc.args!r} exited early: {err}")
        buf += chunk
    sel.close()
    return json.loads(buf.split(b"\n", 1)[0])  # type: ignore[no-any-return]


class Procs:
    """Starts processes and guarantees they are gone after the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def spawn(self, cmd: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        self.count += 1
        err = open(self.tmp / f"proc{self.count}.stderr", "wb")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=HERE.parent.parent)
        err.close()
        self.procs.append(proc)
        try:
            info = read_json_line(proc)
        except RuntimeError:
            raise RuntimeError(f"{cmd} failed: {self.stderr(self.count)}") from None
        info["stderr"] = self.tmp / f"proc{self.count}.stderr"
        return proc, info

    def stderr(self, n: int) -> str:
        return (self.tmp / f"proc{n}.stderr").read_text()

    def app(self, name: str, fail: bool = False) -> int:
        cmd = [PYTHON, str(HERE / "app_server.py"), "--name", name]
        if fail:
            cmd.append("--fail")
        _, info = self.spawn(cmd)
        return int(info["port"])

    def sidecar(self, service: str, version: str, app_port: int,
                snapshot: dict[str, Any], extra: tuple[str, ...] = ()) -> Sidecar:
        path = self.tmp / f"snapshot-{service}-{version}-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(snapshot))
        proc, info = self.spawn([
            *MESH, "sidecar", "--service", service, "--version", version,
            "--app-port", str(app_port), "--config", str(path), "--outbound-port", "0",
            "--inbound-port", "0", "--admin-port", "0", "--watch-interval", "0.2", *extra])
        return Sidecar(proc, info, path)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            for f in (p.stdout, p.stderr):
                if f is not None:
                    f.close()


class Sidecar:
    def __init__(self, proc: subprocess.Popen[bytes], info: dict[str, Any], path: Path) -> None:
        self.proc = proc
        self.info = info
        self.path = path
        self.outbound = int(info["outbound"])
        self.inbound = int(info["inbound"])
        self.admin = int(info["admin"])
        self.tcp: dict[str, int] = info.get("tcp", {})

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def hwm_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")

    def admin_get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def config_dump(self) -> dict[str, Any]:
        status, body = self.admin_get("/config_dump")
        assert status == 200
        return json.loads(body)  # type: ignore[no-any-return]


def snapshot(version: str = "1", **parts: Any) -> dict[str, Any]:
    return {"version": version, **parts}


def request(port: int, path: str = "/", host: str = "reviews", method: str = "GET",
            headers: dict[str, str] | None = None, body: bytes | None = None,
            conn: http.client.HTTPConnection | None = None,
            ) -> tuple[int, dict[str, str], bytes]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = c.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        if own:
            c.close()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, pause: float = 0.0) -> bytes:
    """Send raw bytes, read until the sidecar closes (bounded by timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if pause:
            time.sleep(pause)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out
