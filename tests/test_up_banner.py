"""`mesh up`'s banner as a newcomer reads it: every address it prints answers, even when
the default dashboard and metrics ports are taken (the replica then binds ephemeral ones,
and the banner must say which). Real processes: `mesh up`, nats-server, a replica."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio

from actors.dashboard import DEFAULT_DASHBOARD_PORT
from actors.telemetry import DEFAULT_METRICS_PORT
from bus.http_probe import http_get
from mesh.processes import terminate

MESH = [sys.executable, "-m", "mesh"]


@contextmanager
def occupied(port: int) -> Iterator[None]:
    """Something else listening on 127.0.0.1:port, for as long as the block runs. Already
    busy (another program on this machine) serves the test just as well."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        yield


async def test_banner_names_the_ports_really_bound_when_the_defaults_are_busy(
    tmp_path: Path,
) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MESH_DASHBOARD_PORT", "MESH_METRICS_PORT")
    }
    with ExitStack() as stack:
        stack.enter_context(occupied(DEFAULT_DASHBOARD_PORT))
        stack.enter_context(occupied(DEFAULT_METRICS_PORT))
        proc = await trio.lowlevel.open_process(
            [*MESH, "up", "--nats-port", "0", "--state-dir", str(tmp_path), "--ready-line"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            assert proc.stdout is not None
            out = b""
            with trio.fail_after(60):
                while b'{"event": "ready"' not in out:
                    chunk = await proc.stdout.receive_some(65536)
                    assert chunk, f"mesh up exited before ready:\n{out.decode()}"
                    out += chunk
            banner = out.decode()
            dash = re.search(r"dashboard +http://127\.0\.0\.1:(\d+)/ ", banner)
            metrics = re.search(r"metrics +http://127\.0\.0\.1:(\d+)/metrics ", banner)
            assert dash is not None and metrics is not None, banner
            dash_port, metrics_port = int(dash.group(1)), int(metrics.group(1))
            assert dash_port != DEFAULT_DASHBOARD_PORT and metrics_port != DEFAULT_METRICS_PORT, (
                banner
            )
            assert f"port {DEFAULT_DASHBOARD_PORT} was busy" in banner, banner

            with trio.fail_after(20):
                status, page = await http_get("127.0.0.1", dash_port, "/")
                assert status == 200, page[:200]
                assert b"<title>trio-mesh: service graph</title>" in page
                status, scraped = await http_get("127.0.0.1", metrics_port, "/metrics")
                assert status == 200, scraped[:200]

            proc.send_signal(signal.SIGINT)
            with trio.fail_after(30):
                assert await proc.wait() == 0
                while chunk := await proc.stdout.receive_some(65536):
                    out += chunk
            assert b"Traceback" not in out, out.decode()
        finally:
            await terminate(proc)
