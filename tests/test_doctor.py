"""`mesh doctor` against real ports and a real nats-server."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import trio

from bus.server import NatsServer
from deploy.doctor import FAIL, OK, WARN, check_clock, check_ports, run_checks
from mesh.processes import free_port


def test_clock_before_2026_fails_with_a_fix() -> None:
    check = check_clock(now=0.0)
    assert check.status == FAIL and "NTP" in check.fix
    assert check_clock().status == OK


def test_busy_port_is_reported_with_the_fix() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (check,) = check_ports([(port, "test")])
    assert check.status == WARN and str(port) in check.fix


async def test_nats_without_control_plane_is_a_warning(nats_server: NatsServer, tmp_path: Path) -> None:
    checks = {c.name: c for c in await run_checks(nats_server.url, tmp_path, [])}
    assert checks["nats"].status == OK
    assert checks["control plane"].status == WARN
    assert checks["nats-server"].status == OK


async def test_dead_nats_makes_doctor_exit_1() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "mesh", "doctor", "--nats", url, "--port", str(free_port())],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert b"[FAIL] nats" in result.stdout and b"Traceback" not in result.stderr
