"""A sidecar told to use the control plane starts and serves its file snapshot even when NATS
is not there at all, and says so."""

from __future__ import annotations

import http.client
import socket
import sys
import time
from pathlib import Path

import yaml
from cp_helpers import APP, MESH, Procs


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_sidecar_starts_without_nats_from_its_file(tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        _, app = procs.spawn("app", [sys.executable, str(APP), "--name", "v1"])
        snap = tmp_path / "snap.yaml"
        snap.write_text(
            yaml.safe_dump(
                {
                    "version": "file-1",
                    "services": [{"name": "reviews", "routes": [{}]}],
                    "clusters": [
                        {"name": "reviews", "subsets": {"v1": [f"127.0.0.1:{app['port']}"]}}
                    ],
                }
            )
        )
        start = time.monotonic()
        _, info = procs.spawn(
            "sidecar",
            [
                *MESH,
                "sidecar",
                "--service",
                "productpage",
                "--app-port",
                "9",
                "--config",
                str(snap),
                "--nats",
                f"nats://127.0.0.1:{closed_port()}",
                "--outbound-port",
                "0",
                "--inbound-port",
                "0",
                "--admin-port",
                "0",
            ],
        )
        assert time.monotonic() - start < 5  # it does not wait out the full initial wait
        conn = http.client.HTTPConnection("127.0.0.1", int(info["outbound"]), timeout=5)
        conn.request("GET", "/", headers={"Host": "reviews"})
        resp = conn.getresponse()
        assert resp.status == 200 and b'"name": "v1"' in resp.read()
        conn.close()
        log = (tmp_path / "sidecar.stderr").read_text()
        assert (
            "config sync: cannot reach NATS" in log
            and "keeping version (none from the control plane yet)" in log
        )
    finally:
        procs.close()
