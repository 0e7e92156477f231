"""deploy.supervisor.ChildProcess with real child processes."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from bus.client import BusOptions, connect, redact_url
from bus.errors import BusConnectError
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
