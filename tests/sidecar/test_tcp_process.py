"""Opaque TCP through real `mesh sidecar` processes (plaintext, file snapshots): idle
timeouts on TCP listeners and on HTTP upgrade tunnels, the inbound TCP listener, and TCP
listeners following a reloaded snapshot without a restart."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from sidecar_helpers import Procs, snapshot

ECHO = Path(__file__).parent / "tcp_echo_app.py"


def echo_app(procs: Procs) -> int:
    _, info = procs.spawn([sys.executable, str(ECHO)])
    return int(info["port"])


def round_trip(s: socket.socket, data: bytes) -> bytes:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def closed_by_peer(s: socket.socket, within: float = 10.0) -> bool:
    """True once the peer closes (EOF or reset); False if still open after `within` s
    (a bound on the wait, not a timing assertion)."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def tcp_to(port: int, name: str = "echo", **extra: Any) -> dict[str, Any]:
    return snapshot(clusters=[{"name": name, "subsets": {"v1": [f"127.0.0.1:{port}"]}}],
                    tcp=[{"name": name, "port": 0, "cluster": name, "subset": "v1", **extra}])


def test_tcp_listener_and_inbound_close_idle_connections(procs: Procs) -> None:
    app = echo_app(procs)
    # The destination: an opaque TCP inbound with a short idle timeout.
    dest = procs.sidecar("stock", "v1", app, snapshot(inbound={"tcp": {"idle_timeout": 0.3}}))
    with socket.create_connection(("127.0.0.1", dest.inbound), timeout=5) as s:
        assert round_trip(s, b"hello") == b"hello"
        assert closed_by_peer(s)
    # A caller whose listener allows 0.3 s of silence, through the destination's inbound.
    caller = procs.sidecar("catalog", "v1", 9, tcp_to(dest.inbound, "stock", idle_timeout=0.3))
    with socket.create_connection(("127.0.0.1", caller.tcp["stock"]), timeout=5) as s:
        for _ in range(3):
            assert round_trip(s, b"x" * 1000) == b"x" * 1000
        assert closed_by_peer(s)
    # With the default (1 h) a quiet connection stays open (straight to the app here: the
    # destination above would close it).
    patient = procs.sidecar("catalog", "v2", 9, tcp_to(app, "stock"))
    with socket.create_connection(("127.0.0.1", patient.tcp["stock"]), timeout=5) as s:
        assert round_trip(s, b"hi") == b"hi"
        assert not closed_by_peer(s, within=1.0)
        assert round_trip(s, b"still here") == b"still here"


def test_upgrade_tunnels_close_after_the_tunnel_idle_timeout(procs: Procs) -> None:
    side = procs.sidecar("app", "v1", procs.app("a"),
                         snapshot(limits={"tunnel_idle_timeout": 0.3}))
    with socket.create_connection(("127.0.0.1", side.inbound), timeout=5) as s:
        s.sendall(b"GET /echo-upgrade HTTP/1.1\r\nhost: a\r\nconnection: Upgrade\r\n"
                  b"upgrade: websocket\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        assert round_trip(s, b"frame") == b"frame"
        assert closed_by_peer(s)


def test_tcp_listeners_follow_a_reloaded_snapshot(procs: Procs) -> None:
    app = echo_app(procs)
    side = procs.sidecar("catalog", "v1", 9, tcp_to(app, "one"))
    assert "one" in side.config_dump()["listeners"]["tcp"]
    with socket.socket() as probe:  # a port free now, for the listener the reload adds
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    both = tcp_to(app, "one")
    both["version"] = "2"
    both["clusters"].append({"name": "two", "subsets": {"v1": [f"127.0.0.1:{app}"]}})
    both["tcp"].append({"name": "two", "port": free, "cluster": "two", "subset": "v1"})
    side.path.write_text(yaml.safe_dump(both))
    deadline = time.monotonic() + 10
    while "two" not in side.config_dump()["listeners"]["tcp"]:
        assert time.monotonic() < deadline, "the reload did not add the listener"
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", free), timeout=5) as s:
        assert round_trip(s, b"new") == b"new"
    # A snapshot without "one" closes its port; the sidecar keeps serving.
    only_two = dict(both, version="3", tcp=[both["tcp"][1]], clusters=[both["clusters"][1]])
    old = side.tcp["one"]
    side.path.write_text(yaml.safe_dump(only_two))
    while "one" in side.config_dump()["listeners"]["tcp"]:
        assert time.monotonic() < deadline + 10, "the reload did not remove the listener"
        time.sleep(0.05)
    refused = False
    try:
        socket.create_connection(("127.0.0.1", old), timeout=5).close()
    except ConnectionRefusedError:
        refused = True
    assert refused


def test_bad_tcp_port_flags_and_busy_tcp_ports_are_clear_errors(tmp_path: Path) -> None:
    import subprocess

    from sidecar_helpers import MESH

    cfg = tmp_path / "snap.yaml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg.write_text(yaml.safe_dump(snapshot(
            clusters=[{"name": "db", "subsets": {"v1": ["127.0.0.1:9"]}}],
            tcp=[{"name": "db", "port": port, "cluster": "db", "subset": "v1"}])))
        base = [*MESH, "sidecar", "--service", "a", "--app-port", "9", "--config", str(cfg),
                "--outbound-port", "0", "--inbound-port", "0", "--admin-port", "0"]
        for flag, message in (("db", "--tcp-port 'db': expected NAME=PORT"),
                              ("db=99999", "--tcp-port 'db=99999': expected NAME=PORT"),
                              (f"db={port}", f"tcp db listener: cannot bind 127.0.0.1:{port}")):
            out = subprocess.run([*base, "--tcp-port", flag], capture_output=True, text=True,
                                 timeout=20)
            assert out.returncode == 1, out.stderr
            assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_busy_tcp_port_is_logged_once_retried_with_each_snapshot_and_logged_when_bound(
    procs: Procs,
) -> None:
    app = echo_app(procs)
    side = procs.sidecar("catalog", "v1", 9, tcp_to(app, "one"))
    stderr = side.info["stderr"]
    holder = socket.socket()  # another process's listener, as far as the sidecar can tell
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    wanted = tcp_to(app, "one")
    wanted["clusters"].append({"name": "stock", "subsets": {"v1": [f"127.0.0.1:{app}"]}})
    wanted["tcp"].append({"name": "stock", "port": busy, "cluster": "stock", "subset": "v1"})

    def load(version: str) -> None:
        side.path.write_text(yaml.safe_dump(dict(wanted, version=version)))
        deadline = time.monotonic() + 10
        while side.config_dump()["snapshot"]["version"] != version:
            assert time.monotonic() < deadline, f"snapshot {version} was not loaded"
            time.sleep(0.05)

    failed = f"cannot bind 127.0.0.1:{busy}"
    bound = f"tcp listener for service stock: listening on 127.0.0.1:{busy}"
    try:
        for version in ("2", "3", "4", "5"):  # each swap retries the bind; one line in all
            load(version)
        assert "stock" not in side.config_dump()["listeners"]["tcp"]
        log = stderr.read_text()
        assert log.count(failed) == 1, log
        assert f"tcp listener for service stock: {failed}: Address already in use" in log, log
    finally:
        holder.close()
    load("6")  # the port is free now: this snapshot's retry binds it, and says so once
    deadline = time.monotonic() + 10
    while side.config_dump()["listeners"]["tcp"].get("stock") != busy:
        assert time.monotonic() < deadline, "the listener did not bind the freed port"
        time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", busy), timeout=5) as s:
        assert round_trip(s, b"through") == b"through"
    load("7")
    log = stderr.read_text()
    assert log.count(failed) == 1 and log.count(bound) == 1, log
