"""`mesh up` as a user runs it: real processes, real NATS, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from mesh.processes import terminate

MESH = [sys.executable, "-m", "mesh"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def read_ready_line(proc: trio.Process, timeout: float = 30) -> dict[str, Any]:
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(timeout):
        while True:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"process exited before ready; output: {buf.decode()}")
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b'{"event": "ready"'):
                    info: dict[str, Any] = json.loads(line)
                    return info


async def mesh(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*MESH, *args], capture_stdout=True, capture_stderr=True, check=check, env=env
        )


async def test_up_serves_ping_restarts_a_killed_replica_and_stops_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI finds the admin credentials `mesh up` wrote, as in a user's working directory.
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path / "state"))
    proc = await trio.lowlevel.open_process(
        [*MESH, "up", "--nats-port", "0", "--state-dir", str(tmp_path / "state"), "--ready-line"],
        stdout=subprocess.PIPE,
    )
    try:
        info = await read_ready_line(proc)
        nats = info["nats"][0]
        cp_pid = info["replicas"]["cp-1"]
        answer = await mesh("ping", "--nats", nats, "--json")
        pong = json.loads(answer.stdout)
        assert pong["replica"] == "cp-1" and "ping" in pong["actors"]
        creds = Path(info["creds"]).parent
        assert info["creds"] == str(creds / "admin.json")
        assert {p.name for p in creds.iterdir()} >= {
            "admin.json",
            "controlplane.json",
            "sidecar.json",
        }
        # Security by default: no credentials, or the wrong role, is one clear line.
        anonymous = {k: v for k, v in os.environ.items() if k != "MESH_STATE_DIR"}
        refused = await mesh("ping", "--nats", nats, check=False, env=anonymous)
        err = refused.stderr.decode()
        assert refused.returncode == 1 and "requires credentials" in err, err
        assert "Traceback" not in err
        denied = await mesh(
            "ca", "rotate", "--nats", nats, "--creds", str(creds / "sidecar.json"), check=False
        )
        err = denied.stderr.decode()
        assert denied.returncode == 1 and "not allowed to publish to mesh.ca.command" in err, err
        assert "Traceback" not in err
        status = await mesh("ca", "status", "--nats", nats)  # admin, by default
        assert b"signing" in status.stdout + status.stderr
        token = ("token", "create", "--namespace", "shop", "--service-account", "checkout")
        assert (await mesh(*token, "--nats", nats)).stdout.startswith(b"tmj1.")
        denied = await mesh(
            *token, "--nats", nats, "--creds", str(creds / "sidecar.json"), check=False
        )
        err = denied.stderr.decode()
        assert (
            denied.returncode == 1 and "not allowed to use key-value bucket mesh_tokens" in err
        ), err

        # A crashed replica is restarted by the supervisor and answers again.
        os.kill(cp_pid, signal.SIGKILL)
        with trio.fail_after(20):
            while (
                await mesh("ping", "--nats", nats, "--timeout", "0.5", check=False)
            ).returncode != 0:
                await trio.sleep(0.1)

        nats_pids = [
            int(p)
            for p in (
                await trio.run_process(
                    ["pgrep", "-f", str(tmp_path)], capture_stdout=True, check=False
                )
            ).stdout.split()
        ]
        assert nats_pids, "embedded nats-server not found"
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await proc.wait()
        assert code == 0
        for pid in nats_pids:
            assert not alive(pid), f"pid {pid} survived mesh up"
    finally:
        if proc.returncode is None:  # a failed test: stop it the way a user would first
            await terminate(proc, grace=15)


async def test_ping_with_no_nats_is_a_clear_error() -> None:
    from mesh.processes import free_port

    result = await mesh("ping", "--nats", f"nats://127.0.0.1:{free_port()}", check=False)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "cannot reach NATS" in err and "Traceback" not in err


async def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = await mesh(
            "up", "--nats-port", str(port), "--state-dir", str(tmp_path), check=False
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


async def test_ctrl_c_while_starting_stops_quietly(tmp_path: Path) -> None:
    """Ctrl-C before the banner (the demo's sidecars still starting) stops everything and
    exits 130, with no traceback (run_up used to end without reporting started)."""
    env = {**os.environ, "MESH_DASHBOARD_PORT": "off", "MESH_METRICS_PORT": "off"}
    proc = await trio.lowlevel.open_process(
        [*MESH, "up", "--demo", "--nats-port", "0", "--ingress-port", "0", "--no-load",
         "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            # Printed once NATS is up, before the replicas, apps and sidecars start.
            while b"CA operator secret" not in out:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, out.decode()
                out += chunk
            assert b"trio-mesh is up" not in out
            proc.send_signal(signal.SIGINT)
            while chunk := await proc.stdout.receive_some(4096):
                out += chunk
            assert await proc.wait() == 130, out.decode()
        assert b"Traceback" not in out and b"never awaited" not in out, out.decode()
        assert b"trio-mesh is up" not in out, out.decode()
    finally:
        await terminate(proc)


@pytest.mark.parametrize("bad", ["http://x:1", "127.0.0.1:4222", "nats://a:1,ftp://b"])
async def test_up_rejects_bad_nats_urls(bad: str, tmp_path: Path) -> None:
    result = await mesh("up", "--nats", bad, "--state-dir", str(tmp_path), check=False)
    assert result.returncode == 1 and "not a NATS URL" in result.stderr.decode()


def children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (they run in sessions of their own)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().split(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry))
    return kids


def program(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[0]


async def test_nothing_survives_a_killed_supervisor(tmp_path: Path) -> None:
    # The demo has every kind of child: nats-server, a replica, apps, sidecars.
    proc = await trio.lowlevel.open_process(
        [*MESH, "up", "--demo", "--nats-port", "0", "--ingress-port", "0",
         "--state-dir", str(tmp_path / "state"), "--ready-line"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    kids: list[int] = []
    try:
        await read_ready_line(proc, timeout=60)
        kids = [k for k in children_of(proc.pid) if alive(k)]
        names = {program(k) for k in kids}
        assert any(n.endswith(b"nats-server") for n in names), names
        proc.kill()  # no chance to clean up
        await proc.wait()
        # Replicas and sidecars see their parent gone; the orphan guard stops the rest
        # (nats-server and the apps), SIGKILL after its grace period.
        with trio.fail_after(15):
            while left := [k for k in kids if alive(k)]:
                await trio.sleep(0.1)
        assert not left
    finally:
        if proc.returncode is None:  # a failed test: stop it the way a user would first
            await terminate(proc, grace=15)
        for pid in kids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


async def test_nats_cluster_command_and_up_joining_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))  # `mesh nats` wrote nats-creds/ here
    cluster = await trio.lowlevel.open_process(
        [*MESH, "nats", "--cluster", "3", "--state-dir", str(tmp_path / "nats"), "--ready-line"],
        stdout=subprocess.PIPE,
    )
    up: trio.Process | None = None
    try:
        urls = (await read_ready_line(cluster))["urls"]
        assert len(urls) == 3
        up = await trio.lowlevel.open_process(
            [
                *MESH,
                "up",
                "--nats",
                ",".join(urls),
                "--replicas",
                "2",
                "--ready-line",
                "--creds",
                str(tmp_path / "nats-creds" / "controlplane.json"),
                "--state-dir",
                str(tmp_path / "up"),
            ],
            stdout=subprocess.PIPE,
        )
        info = await read_ready_line(up)
        assert info["nats"] == urls and sorted(info["replicas"]) == ["cp-1", "cp-2"]
        # Any node will do: the cluster routes the request to a replica.
        seen = set()
        for url in urls:
            pong = json.loads((await mesh("ping", "--nats", url, "--json")).stdout)
            seen.add(pong["replica"])
        assert seen <= {"cp-1", "cp-2"}
        for proc in (up, cluster):
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await proc.wait() == 0
    finally:
        for proc in (up, cluster):
            if proc is not None and proc.returncode is None:
                await terminate(proc, grace=15)
