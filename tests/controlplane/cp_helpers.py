"""Real processes for control-plane tests: NATS, `mesh controlplane`, apps, `mesh sidecar --nats`.

Readiness comes from each process's JSON ready line, never from a sleep; every process is
stopped in `close()` (SIGTERM, then SIGKILL after a deadline).
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from bus.binary import find_nats_server
from bus.client import connect
from bus.server import NodeSpec
from mesh.messages import Message

ROOT = Path(__file__).resolve().parent.parent.parent
MESH = [str(Path(sys.executable).parent / "mesh")]
APP = ROOT / "tests" / "sidecar" / "app_server.py"
ENV = {**os.environ, "MESH_CA_SECRET": "controlplane-test-secret-0123456789"}


def read_ready(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> dict[str, Any]:
    """The first stdout line that is a JSON object (other lines are skipped)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    info: dict[str, Any] = json.loads(line)
                    return info
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"no ready line from {proc.args!r} in {timeout}s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{proc.args!r} exited before it was ready")
            buf += chunk
    finally:
        sel.close()


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        with open(self.tmp / f"{name}.stderr", "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=ENV)
        self.procs.append(proc)
        try:
            return proc, read_ready(proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {(self.tmp / f'{name}.stderr').read_text()}") from None

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            self.stop(p)
            if p.stdout is not None:
                p.stdout.close()


class Mesh:
    """NATS + one control-plane replica + reviews v1/v2 and productpage sidecars."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs = Procs(tmp)
        self.nats_proc, info = self.start_nats("0")
        self.nats: str = info["urls"][0]
        self.start_controlplane()
        self.sidecars: dict[str, dict[str, Any]] = {}
        for version in ("v1", "v2"):
            _, app = self.procs.spawn(
                f"app-{version}", [sys.executable, str(APP), "--name", version]
            )
            self.sidecar(f"reviews-{version}", "reviews", version, int(app["port"]))
        self.sidecar("productpage", "productpage", "v1", 9)  # a client only: no app behind

    def start_nats(self, port: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        """nats-server itself (not `mesh nats`, whose child could outlive a SIGKILL of it)."""
        spec = NodeSpec("cp-test", self.tmp / "nats", port=int(port))
        spec.resolve_ports()
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        conf = spec.state_dir / "nats.conf"
        conf.write_text(spec.config_text())
        with open(self.tmp / "nats.stderr", "ab") as err:
            proc = subprocess.Popen(
                [str(find_nats_server()), "-c", str(conf)], stdout=err, stderr=err
            )
        self.procs.procs.append(proc)
        deadline = time.monotonic() + 15
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", spec.http_port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not become healthy: see {self.tmp}")
            time.sleep(0.02)
        return proc, {"urls": [f"nats://127.0.0.1:{spec.port}"]}

    def stop_nats(self) -> None:
        self.procs.stop(self.nats_proc)

    def start_controlplane(self, replica: str = "cp-1") -> subprocess.Popen[bytes]:
        cmd = [*MESH, "-v", "controlplane", "--nats", self.nats, "--replica", replica]
        proc, _ = self.procs.spawn(replica if replica != "cp-1" else "cp", [*cmd, "--ready-line"])
        if replica == "cp-1":
            self.cp = proc
        return proc

    def sidecar(self, name: str, service: str, version: str, app_port: int) -> dict[str, Any]:
        _, info = self.procs.spawn(
            name,
            [
                *MESH,
                "-v",
                "sidecar",
                "--service",
                service,
                "--version",
                version,
                "--app-port",
                str(app_port),
                "--nats",
                self.nats,
                "--instance",
                name,
                "--heartbeat",
                "0.5",
                "--outbound-port",
                "0",
                "--inbound-port",
                "0",
                "--admin-port",
                "0",
            ],
        )
        self.sidecars[name] = info
        return info

    def mesh(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MESH, *args, "--nats", self.nats],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=ENV,
        )

    def ok(self, *args: str) -> str:
        res = self.mesh(*args)
        assert res.returncode == 0, f"mesh {' '.join(args)}: {res.stdout}{res.stderr}"
        return res.stdout

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ok("status", "--json"))
        return out

    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["instance"]: r for r in self.status()["sidecars"]}

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def traffic(self, n: int, path: str = "/") -> Counter[str]:
        """n requests productpage -> reviews; counts app names, and 'error <status>'."""
        port = int(self.sidecars["productpage"]["outbound"])
        seen: Counter[str] = Counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(n):
                conn.request("GET", path, headers={"Host": "reviews"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    seen[json.loads(body)["name"]] += 1
                else:
                    seen[f"error {resp.status}"] += 1
        finally:
            conn.close()
        return seen

    def publish(self, subject: str, message: Message) -> None:
        async def main() -> None:
            async with connect(self.nats, connect_timeout=3.0) as bus:
                await bus.publish(subject, message)
                await bus.flush()

        trio.run(main)

    def close(self) -> None:
        self.procs.close()
