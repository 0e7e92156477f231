"""deploy.supervisor.ChildProcess with real child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from bus.client import BusOptions, connect, redact_url
from bus.errors import BusConnectError
from bus.http_probe import http_get
from deploy.supervisor import ChildFailed, ChildProcess
from mesh.processes import free_port


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_child_that_never_gets_ready_fails_startup_and_is_stopped() -> None:
    child = ChildProcess(
        "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"],
        ready_timeout=0.5, startup_attempts=2, backoff_base=0.01,
    )  # fmt: skip
    with trio.fail_after(20), pytest.raises(ChildFailed, match=r"sleeper was not ready within 0\.5 s"):
        await child.run()
    assert child.process is not None and gone(child.process.pid)
    assert child.restarts == 1


async def test_a_child_that_crashes_after_ready_is_restarted() -> None:
    script = "import json,sys; print(json.dumps({'event': 'ready'}), flush=True); sys.exit(3)"
    child = ChildProcess("crasher", [sys.executable, "-c", script], backoff_base=0.05, stable_after=60)
    async with trio.open_nursery() as nursery:
        await nursery.start(child.run)
        with trio.fail_after(20):
            while child.restarts < 3:
                await trio.sleep(0.02)
        child.stop()
        nursery.cancel_scope.cancel()
    assert child.restarts >= 3


async def test_credentials_never_appear_in_errors() -> None:
    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"
    assert redact_url(url).startswith("nats://***@127.0.0.1:")
    assert "s3cret" not in BusOptions(servers=(url,)).display_servers
    with pytest.raises(BusConnectError) as info:
        async with connect(url, connect_timeout=0.5):
            pass
    assert "s3cret" not in str(info.value) and "127.0.0.1" in str(info.value)


async def test_a_sidecar_exits_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    snap = tmp_path / "s.yaml"
    snap.write_text("version: '1'\n")
    parent_script = (
        "import subprocess, sys\n"
        "from mesh.processes import child_kwargs\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'mesh', 'sidecar', '--service', 's', '--app-port', '9',"
        f" '--config', {str(snap)!r}, '--outbound-port', '0', '--inbound-port', '0', '--admin-port', '0'],"
        " stdout=subprocess.PIPE, **child_kwargs())\n"
        "print(p.pid, flush=True); print(p.stdout.readline().decode(), flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    parent = await trio.lowlevel.open_process([sys.executable, "-c", parent_script], stdout=subprocess.PIPE)
    sidecar_pid = 0
    try:
        assert parent.stdout is not None
        out = b""
        with trio.fail_after(30):
            while b"ready" not in out:
                out += await parent.stdout.receive_some(4096)
        pid_line, ready_line = out.split(b"\n", 2)[:2]
        sidecar_pid = int(pid_line)
        admin = json.loads(ready_line)["admin"]
        # Serving before the supervisor dies, so its exit afterwards is the parent watch.
        status, _ = await http_get("127.0.0.1", admin, "/healthz")
        assert status == 200
        parent.kill()
        await parent.wait()
        with trio.fail_after(15):
            while not gone(sidecar_pid) and not zombie(sidecar_pid):
                await trio.sleep(0.1)
    finally:
        if parent.returncode is None:
            parent.kill()
        if sidecar_pid and not gone(sidecar_pid):
            os.kill(sidecar_pid, 9)


def zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


async def test_withheld_variables_do_not_reach_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    from deploy.topology_run import APP_WITHHELD_ENV

    monkeypatch.setenv("MESH_CA_SECRET", "x" * 32)
    monkeypatch.setenv("MESH_NATS_CREDS", "/somewhere/controlplane.json")
    monkeypatch.setenv("HARMLESS", "kept")
    script = ("import json, os; print(json.dumps({'event': 'ready', 'env': sorted(k for k in "
              "os.environ if k.startswith(('MESH_', 'HARMLESS')))}), flush=True); input()")
    child = ChildProcess("app", [sys.executable, "-c", script], env={"MESH_APP_OWN": "1"},
                         withhold_env=APP_WITHHELD_ENV)
    async with trio.open_nursery() as nursery:
        await nursery.start(child.run)
        ready = json.loads(next(line for line in child._output if '"ready"' in line))
        child.stop()
        nursery.cancel_scope.cancel()
    assert "MESH_CA_SECRET" not in ready["env"] and "MESH_NATS_CREDS" not in ready["env"]
    assert "HARMLESS" in ready["env"] and "MESH_APP_OWN" in ready["env"]
