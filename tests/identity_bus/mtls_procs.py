"""Real `mesh sidecar` and app processes for the mTLS tests, driven from trio.

The CA runs in the test process (identity_bus_helpers.running_mesh), so processes are
started and read asynchronously: a blocking read of a ready line would stall the CA that
the sidecar is waiting on. Every process is terminated (then killed) in `close`.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import trio
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
APP = ROOT / "tests" / "sidecar" / "app_server.py"
MESH = str(Path(sys.executable).parent / "mesh")


def _open_for_stderr(path: Path) -> BinaryIO:
    return open(path, "wb")  # closed by the caller's with


class Proc:
    def __init__(self, proc: trio.Process, info: dict[str, Any], stderr: Path) -> None:
        self.proc = proc
        self.info = info
        self.stderr_path = stderr

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    @property
    def outbound(self) -> int:
        return int(self.info["outbound"])

    @property
    def inbound(self) -> int:
        return int(self.info["inbound"])

    @property
    def admin(self) -> int:
        return int(self.info["admin"])


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[trio.Process] = []

    async def spawn(self, cmd: list[str], timeout: float = 20.0) -> Proc:
        n = len(self.procs)
        err_path = self.tmp / f"proc{n}.stderr"
        with _open_for_stderr(err_path) as err:
            proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, stderr=err,
                                                    cwd=ROOT)
        self.procs.append(proc)
        assert proc.stdout is not None
        buf = b""
        with trio.move_on_after(timeout):
            while b"\n" not in buf:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
        if b"\n" not in buf:
            raise RuntimeError(f"{cmd[:4]}: no ready line: {err_path.read_text()}")
        return Proc(proc, json.loads(buf.split(b"\n", 1)[0]), err_path)

    async def run_to_exit(self, cmd: list[str], timeout: float = 20.0) -> tuple[int, str]:
        """Run a command expected to exit; (code, stderr)."""
        err_path = self.tmp / f"exit{len(self.procs)}.stderr"
        with _open_for_stderr(err_path) as err:
            proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                                    cwd=ROOT)
        self.procs.append(proc)
        with trio.fail_after(timeout):
            code = await proc.wait()
        return code, err_path.read_text()

    async def app(self, name: str) -> int:
        p = await self.spawn([sys.executable, str(APP), "--name", name])
        return int(p.info["port"])

    async def sidecar(self, service: str, app_port: int, snapshot: dict[str, Any],
                      *extra: str) -> Proc:
        path = self.tmp / f"snap-{service}-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(snapshot))
        return await self.spawn([
            MESH, "sidecar", "--service", service, "--app-port", str(app_port),
            "--config", str(path), "--outbound-port", "0", "--inbound-port", "0",
            "--admin-port", "0", "--watch-interval", "3600", *extra])

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        with trio.move_on_after(5):
            for p in self.procs:
                await p.wait()
        for p in self.procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
            if p.stdout is not None:
                await p.stdout.aclose()


async def http(port: int, path: str = "/anything", host: str = "inventory",
               method: str = "GET", headers: dict[str, str] | None = None,
               ctx: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (connection: close), read to EOF. With `ctx`, a
    TLS client straight to a sidecar's inbound port. A refused TLS handshake gives (0, ...)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = tcp
    if ctx is not None:
        stream = trio.SSLStream(tcp, ctx, server_hostname=None, https_compatible=True)
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    raw = b""
    try:
        with trio.fail_after(10):
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            while data := await stream.receive_some(65536):
                raw += data
    except trio.BrokenResourceError:
        pass
    finally:
        await trio.aclose_forcefully(stream)
    if not raw:
        return 0, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), hdrs, body


async def admin_get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http(port, path, host="admin")
    return status, body


async def metric(port: int, name: str, labels: str = "") -> float:
    _, body = await admin_get(port, "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (not labels or labels in line):
            total += float(line.rsplit(" ", 1)[1])
    return total
