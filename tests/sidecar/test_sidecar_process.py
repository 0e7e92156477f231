"""The `mesh sidecar` process: reloads, bad input on the command line, signals, TCP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import yaml
from sidecar_helpers import MESH, Procs, request, snapshot


def _routes_to(version: str, ports: dict[str, int], target: str) -> dict[str, Any]:
    return snapshot(version=version, services=[
        {"name": "reviews", "routes": [{"split": {target: 1}}]}],
        clusters=[{"name": "reviews", "subsets": {
            k: [f"127.0.0.1:{p}"] for k, p in ports.items()}}])


def _wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_sighup_and_file_watch_reload(procs: Procs) -> None:
    ports = {"v1": procs.app("v1"), "v2": procs.app("v2")}
    side = procs.sidecar("productpage", "v1", 1, _routes_to("1", ports, "v1"))
    assert request(side.outbound, "/")[1]["x-app"] == "v1"

    # The file watch: a new version is picked up without a signal.
    side.path.write_text(yaml.safe_dump(_routes_to("2", ports, "v2")))
    _wait_for(lambda: side.config_dump()["snapshot"]["version"] == "2")
    assert request(side.outbound, "/")[1]["x-app"] == "v2"

    # An invalid file is refused, the old snapshot keeps serving, the log says why.
    bad = _routes_to("3", ports, "v3")
    side.path.write_text(yaml.safe_dump(bad))
    stderr = side.info["stderr"]
    _wait_for(lambda: "services[0].routes[0].split.v3" in stderr.read_text())
    assert side.config_dump()["reloads"]["failed"] >= 1
    assert side.config_dump()["snapshot"]["version"] == "2"
    assert request(side.outbound, "/")[1]["x-app"] == "v2"
    log = stderr.read_text()
    assert "keeping version 2" in log and "Traceback" not in log

    # SIGHUP reloads too (the file changed under the same mtime granularity is fine).
    side.path.write_text(yaml.safe_dump(_routes_to("4", ports, "v1")))
    side.proc.send_signal(signal.SIGHUP)
    _wait_for(lambda: side.config_dump()["snapshot"]["version"] == "4")
    assert request(side.outbound, "/")[1]["x-app"] == "v1"


def test_sigterm_stops_cleanly_and_ready_file(procs: Procs) -> None:
    ready = procs.tmp / "ready.json"
    side = procs.sidecar("a", "v1", procs.app("a"), snapshot(),
                         extra=("--ready-file", str(ready)))
    info = json.loads(ready.read_text())
    assert info["event"] == "ready" and info["inbound"] == side.inbound
    assert info["pid"] == side.proc.pid
    side.proc.send_signal(signal.SIGTERM)
    assert side.proc.wait(5) == 0


def _run_cli(*args: str, tmp: Any = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESH, "sidecar", *args], capture_output=True, text=True,
                          timeout=20, cwd=tmp)


def test_cli_reports_bad_snapshot_without_traceback(tmp_path: Any) -> None:
    cfg = tmp_path / "snap.yaml"
    cfg.write_text(yaml.safe_dump(snapshot(
        services=[{"name": "r", "routes": [{"cluster": "nope"}]}])))
    out = _run_cli("--service", "r", "--app-port", "9", "--config", str(cfg))
    assert out.returncode == 1
    assert "snap.yaml: services[0].routes[0].cluster: cluster 'nope' does not exist" in out.stderr
    assert "Traceback" not in out.stderr

    out = _run_cli("--service", "r", "--app-port", "9", "--config", str(tmp_path / "missing"))
    assert out.returncode == 1 and "cannot read snapshot" in out.stderr

    cfg.write_text("version: [unclosed")
    out = _run_cli("--service", "r", "--app-port", "9", "--config", str(cfg))
    assert out.returncode == 1 and "not valid YAML" in out.stderr

    cfg.write_text(yaml.safe_dump(snapshot(service="other")))
    out = _run_cli("--service", "r", "--app-port", "9", "--config", str(cfg))
    assert out.returncode == 1 and "snapshot is for 'other'" in out.stderr


def test_cli_reports_port_in_use(tmp_path: Any) -> None:
    cfg = tmp_path / "snap.yaml"
    cfg.write_text(yaml.safe_dump(snapshot()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _run_cli("--service", "r", "--app-port", "9", "--config", str(cfg),
                       "--outbound-port", str(port), "--inbound-port", "0", "--admin-port", "0")
    assert out.returncode == 1
    assert f"outbound listener: cannot bind 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_opaque_tcp_is_proxied_as_bytes(procs: Procs) -> None:
    _, info = procs.spawn([sys.executable, "-c", ECHO_SERVER])
    side = procs.sidecar("a", "v1", procs.app("a"), snapshot(
        clusters=[{"name": "echo", "subsets": {"v1": [f"127.0.0.1:{info['port']}"]}}],
        tcp=[{"name": "echo", "port": 0, "cluster": "echo", "subset": "v1"}]))
    tcp_port = int(side.tcp["echo"])
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=5) as s:
        payload = bytes(range(256)) * 1000
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # the half-close travels through the proxy
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got == payload


# A non-HTTP server: echoes one connection's bytes until EOF, then closes.
ECHO_SERVER = """
import json, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(json.dumps({"port": s.getsockname()[1]}), flush=True)
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""
