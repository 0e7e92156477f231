"""Data-plane benchmark: direct vs 1 hop vs 2 hops through the sidecar, against HAProxy.

Everything runs on loopback and is started (and stopped) by this script: an nginx
upstream serving 1 KB responses, `mesh sidecar` processes with routing and retries on,
and HAProxy (Debian package) as the reference proxy. Load comes from `wrk -t1`.

    apt-get install -y wrk haproxy nginx
    .venv/bin/python bench/dataplane.py            # 3 rounds x 3 s per point, ~4 min
    .venv/bin/python bench/dataplane.py --quick    # 1 round x 2 s per point, ~1 min
    .venv/bin/python bench/dataplane.py --mtls     # 2 hops: sidecar mTLS vs plaintext vs
                                                   # HAProxy mTLS (certs from our CA)
    .venv/bin/python bench/dataplane.py --baseline REV   # also the sidecar as of git REV
                                                         # (before/after in one run)

Also measured, 1 hop: a bare trio proxy (bench/floor_proxy.py: no routing, no telemetry,
raw non-blocking sockets), the floor of any proxy written in Python on trio, and the
sidecar with --no-telemetry.

Reported per setup and concurrency: rps, p50/p90/p99, added p50 latency per hop at
c=1 versus direct, and proxy CPU (sum of the proxy processes' utime+stime from
/proc/PID/stat) per request per hop and per 1000 rps. Then the ratios against HAProxy
that issue 3 sets as goals. The machine is shared and noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from mesh import pki
from mesh.spiffe import SpiffeId

ROOT = Path(__file__).resolve().parents[1]
TRUST_DOMAIN = "bench.mesh"
MESH = str(Path(sys.executable).parent / "mesh")
TICKS = os.sysconf("SC_CLK_TCK")
BODY = b"x" * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime


class Stack:
    """Processes of one run; all stopped in close()."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], **kw: object) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"stderr-{len(self.procs)}", "wb")  # read when one fails
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err,
                                **kw)  # type: ignore[call-overload]
        err.close()
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def nginx(self) -> int:
        port = free_port()
        (self.tmp / "body").write_bytes(BODY)
        conf = self.tmp / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {self.tmp}/nginx.pid;
error_log {self.tmp}/nginx.err;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {self.tmp}; try_files /body =404; default_type text/plain; }}
    }}
}}
""")
        self.start(["nginx", "-c", str(conf), "-p", str(self.tmp), "-g", "daemon off;"])
        wait_port(port)
        return port

    def haproxy(self, target: int) -> tuple[int, int]:
        return self._haproxy(f"127.0.0.1:{target}")

    def _haproxy(self, target: str, bind: str = "", server: str = "") -> tuple[int, int]:
        port = free_port()
        conf = self.tmp / f"haproxy-{port}.cfg"
        conf.write_text(f"""
global
    nbthread 1
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port} {bind}
    default_backend be
backend be
    http-reuse always
    server s1 {target} {server}
""")
        proc = self.start(["haproxy", "-f", str(conf), "-db"])
        wait_port(port)
        return port, proc.pid

    def sidecar(self, service: str, app_port: int, snapshot: dict[str, object],
                extra: tuple[str, ...] = (), src: Path | None = None
                ) -> tuple[dict[str, int], int]:
        """A `mesh sidecar`; `src`: run the code in that tree instead (a --baseline)."""
        path = self.tmp / f"snapshot-{service}-{len(self.procs)}.yaml"
        path.write_text(yaml.safe_dump(snapshot))
        env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
        proc = self.start([MESH, "sidecar", "--service", service, "--app-port", str(app_port),
                           "--config", str(path), "--outbound-port", "0",
                           "--inbound-port", "0", "--admin-port", "0", *extra], cwd=ROOT,
                          env=env)
        return self.ready_line(proc, f"sidecar {service}"), proc.pid

    def floor_proxy(self, target: int) -> tuple[int, int]:
        proc = self.start([sys.executable, str(ROOT / "bench" / "floor_proxy.py"),
                           str(target)])
        return int(self.ready_line(proc, "floor proxy")["outbound"]), proc.pid

    def checkout(self, rev: str) -> Path:
        """The tree at git `rev`, extracted for a --baseline sidecar."""
        dest = self.tmp / f"src-{rev}"
        dest.mkdir()
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest

    def ready_line(self, proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                n = self.procs.index(proc)
                err = (self.tmp / f"stderr-{n}").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{what} did not start: {err}")
            if line.startswith(b'{"event"'):
                return json.loads(line)  # type: ignore[no-any-return]

    # -- mTLS: NATS + a CA whose root the bench holds, so HAProxy gets leaves of it too --

    def mtls_ca(self) -> tuple[str, pki.CertificateAuthority]:
        """nats-server and a control plane (the CA) loading our root as an operator CA."""
        ca = pki.generate_root(TRUST_DOMAIN)
        cert, key = self.tmp / "ca.pem", self.tmp / "ca.key"
        cert.write_bytes(ca.chain_pem())
        key.write_bytes(ca.key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        key.chmod(0o600)
        nats = self.start([MESH, "nats", "--port", "0", "--ready-line", "--state-dir",
                           str(self.tmp / "nats")], cwd=ROOT)
        url = str(self.ready_line(nats, "nats")["urls"][0])
        self.creds = self.tmp / "nats-creds"  # `mesh nats` made a user per role here
        env = {**os.environ, "MESH_CA_SECRET": os.urandom(16).hex(),
               "MESH_NATS_CREDS": str(self.creds / "controlplane.json"),
               "MESH_CA_CERT": str(cert), "MESH_CA_KEY": str(key),
               "MESH_TRUST_DOMAIN": TRUST_DOMAIN}
        cp = self.start([MESH, "controlplane", "--nats", url, "--ready-line"], cwd=ROOT,
                        env=env)
        self.ready_line(cp, "controlplane")
        return url, ca

    def token(self, nats: str, service: str) -> list[str]:
        """--identity/--token-file flags for a sidecar of `service`."""
        out = subprocess.run([MESH, "token", "create", "--nats", nats,
                              "--creds", str(self.creds / "admin.json"), "--trust-domain",
                              TRUST_DOMAIN, "--namespace", "bench", "--service-account",
                              service], capture_output=True, text=True, check=True, cwd=ROOT)
        path = self.tmp / f"token-{service}"
        path.write_text(out.stdout.strip())
        return ["--ca-nats", nats, "--identity", f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{service}",
                "--token-file", str(path), "--creds", str(self.creds / "sidecar.json")]

    def leaf_pem(self, ca: pki.CertificateAuthority, name: str) -> Path:
        """cert chain + key for HAProxy, issued by the mesh's CA."""
        ident = SpiffeId(TRUST_DOMAIN, "bench", name)
        key = pki.generate_key()
        svid = pki.Svid(ca.sign_csr(pki.build_csr(key, ident), ident), key)
        path = self.tmp / f"{name}.pem"
        path.write_bytes(svid.issued.chain_pem + svid.key_pem())
        path.chmod(0o600)
        return path

    def haproxy_mtls(self, target: int, ca: pki.CertificateAuthority
                     ) -> tuple[int, list[int]]:
        """Two HAProxies: client side (plaintext in, mTLS out, server cert verified against
        the bundle) and server side (mTLS in, client cert required; plaintext to nginx)."""
        bundle = self.tmp / "bundle.pem"
        bundle.write_bytes(ca.bundle.pem)
        b_pem, a_pem = self.leaf_pem(ca, "haproxy-b"), self.leaf_pem(ca, "haproxy-a")
        tls = "ssl-min-ver TLSv1.3"
        port_b, pid_b = self._haproxy(f"127.0.0.1:{target}",
                                      bind=f"ssl crt {b_pem} ca-file {bundle} verify required "
                                           f"{tls}")
        port_a, pid_a = self._haproxy(f"127.0.0.1:{port_b}",
                                      server=f"ssl crt {a_pem} ca-file {bundle} verify required "
                                             f"{tls}")
        return port_a, [pid_a, pid_b]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def client_snapshot(target: int) -> dict[str, object]:
    """Routing and retries on, as the goal asks: a matched route, a split, a retry policy."""
    return {"version": "bench", "services": [{"name": "upstream", "routes": [
        {"name": "api", "match": {"path": {"prefix": "/api"}}, "split": {"v1": 1}},
        {"name": "default", "split": {"v1": 1}, "timeout": 10, "retries": {
            "attempts": 3, "on": ["connect-failure", "reset", 503]}},
    ]}], "clusters": [{"name": "upstream", "subsets": {"v1": [f"127.0.0.1:{target}"]}}]}


@dataclass
class Point:
    rps: float
    p50: float
    p90: float
    p99: float
    cpu_us_per_req: float  # all proxy processes together
    sys_us_per_req: float = 0.0  # the kernel's share of it (system time)


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def run_wrk(port: int, conns: int, seconds: float, pids: list[int]) -> Point:
    before = [cpu_split(p) for p in pids]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", "-H", "Host: upstream",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30,
        check=True).stdout
    after = [cpu_split(p) for p in pids]
    cpu = sum(u + s for u, s in after) - sum(u + s for u, s in before)
    sys_cpu = sum(s for _, s in after) - sum(s for _, s in before)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} bad responses on port {port}")
    pct = {}
    for label in ("50", "90", "99"):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m is not None, out
        pct[label] = float(m.group(1)) * _UNITS[m.group(2)]
    return Point(rps, pct["50"], pct["90"], pct["99"], cpu / max(total, 1) * 1e6,
                 sys_cpu / max(total, 1) * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one round of 2 s per point instead of 3 rounds of 3 s")
    ap.add_argument("--rounds", type=int,
                    help="rounds; each point is the median over rounds, and rounds visit "
                         "every setup in turn so that machine noise hits all of them alike")
    ap.add_argument("--seconds", type=float, help="seconds per point")
    ap.add_argument("--conns", default="1,16,64", help="concurrency levels, comma separated")
    ap.add_argument("--only", help="measure only setups whose name contains this (plus direct)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run the sidecar as of this git revision (1 and 2 hops), "
                         "for a before/after in the same run")
    ap.add_argument("--mtls", action="store_true",
                    help="the 2-hop path only: sidecars with mTLS (identities from a CA in a "
                         "control plane on NATS) vs plaintext vs HAProxy with mTLS (leaves of "
                         "the same CA); default --conns 1,16")
    args = ap.parse_args()
    if args.mtls and args.conns == "1,16,64":
        args.conns = "1,16"
    seconds = args.seconds or (2.0 if args.quick else 3.0)
    rounds = args.rounds or (1 if args.quick else 3)
    conns = [int(c) for c in args.conns.split(",")]
    for tool in ("wrk", "haproxy", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found: apt-get install -y wrk haproxy nginx",
                  file=sys.stderr)
            return 1

    tmp = Path(tempfile.mkdtemp(prefix="mesh-bench-"))
    tmp.chmod(0o755)  # nginx workers drop root and must read the body file
    stack = Stack(tmp)
    try:
        upstream = stack.nginx()
        setups: list[tuple[str, int, int, list[int]]] = [("direct", upstream, 0, [])]
        if args.mtls:
            setups += mtls_setups(stack, upstream)
        else:
            setups += plain_setups(stack, upstream)
            if args.baseline:
                setups += sidecar_setups(stack, upstream, f" @{args.baseline}",
                                         stack.checkout(args.baseline))
        if args.only:
            setups = [x for x in setups if x[0] == "direct" or args.only in x[0]]
        for _name, port, _, pids in setups:
            run_wrk(port, 16, 1, pids)  # warm up pools and caches
        samples: dict[tuple[str, int], list[Point]] = {}
        for r in range(rounds):
            for c in conns:
                for name, port, _, pids in setups:
                    point = run_wrk(port, c, seconds, pids)
                    samples.setdefault((name, c), []).append(point)
                    print(f"  round {r + 1}/{rounds} {name:26} c={c:<3} {point.rps:9.0f} rps",
                          file=sys.stderr, flush=True)
        results = {key: _median(points) for key, points in samples.items()}
        report(setups, conns, results, seconds, rounds)
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def mtls_setups(stack: Stack, upstream: int) -> list[tuple[str, int, int, list[int]]]:
    nats, ca = stack.mtls_ca()
    setups: list[tuple[str, int, int, list[int]]] = []
    h2b, h2bpid = stack.haproxy(upstream)
    h2a, h2apid = stack.haproxy(h2b)
    setups.append(("haproxy 2 hops", h2a, 2, [h2apid, h2bpid]))
    hm, hm_pids = stack.haproxy_mtls(upstream, ca)
    setups.append(("haproxy 2 hops mTLS", hm, 2, hm_pids))
    server, server_pid = stack.sidecar("upstream", upstream, {"version": "bench"})
    client, client_pid = stack.sidecar("bench2", 1, client_snapshot(server["inbound"]))
    setups.append(("sidecar 2 hops", client["outbound"], 2, [client_pid, server_pid]))
    mserver, mserver_pid = stack.sidecar("upstream", upstream, {"version": "bench"},
                                         tuple(stack.token(nats, "upstream")))
    mclient, mclient_pid = stack.sidecar("bench2", 1, client_snapshot(mserver["inbound"]),
                                         tuple(stack.token(nats, "bench2")))
    setups.append(("sidecar 2 hops mTLS", mclient["outbound"], 2, [mclient_pid, mserver_pid]))
    return setups


def plain_setups(stack: Stack, upstream: int) -> list[tuple[str, int, int, list[int]]]:
    setups: list[tuple[str, int, int, list[int]]] = []
    h1, h1pid = stack.haproxy(upstream)
    setups.append(("haproxy 1 hop", h1, 1, [h1pid]))
    h2b, h2bpid = stack.haproxy(upstream)
    h2a, h2apid = stack.haproxy(h2b)
    setups.append(("haproxy 2 hops", h2a, 2, [h2apid, h2bpid]))
    floor, floor_pid = stack.floor_proxy(upstream)
    setups.append(("trio floor 1 hop", floor, 1, [floor_pid]))
    setups += sidecar_setups(stack, upstream)
    quiet, quiet_pid = stack.sidecar("bench3", 1, client_snapshot(upstream), ("--no-telemetry",))
    setups.append(("sidecar 1 hop no-tel", quiet["outbound"], 1, [quiet_pid]))
    return setups


def sidecar_setups(stack: Stack, upstream: int, suffix: str = "", src: Path | None = None
                   ) -> list[tuple[str, int, int, list[int]]]:
    one, one_pid = stack.sidecar("bench1", 1, client_snapshot(upstream), src=src)
    server, server_pid = stack.sidecar("upstream", upstream, {"version": "bench"}, src=src)
    client, client_pid = stack.sidecar("bench2", 1, client_snapshot(server["inbound"]),
                                       src=src)
    return [(f"sidecar 1 hop{suffix}", one["outbound"], 1, [one_pid]),
            (f"sidecar 2 hops{suffix}", client["outbound"], 2, [client_pid, server_pid])]


def _median(points: list[Point]) -> Point:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    return Point(med([p.rps for p in points]), med([p.p50 for p in points]),
                 med([p.p90 for p in points]), med([p.p99 for p in points]),
                 med([p.cpu_us_per_req for p in points]),
                 med([p.sys_us_per_req for p in points]))


def report(setups: list[tuple[str, int, int, list[int]]], conns: list[int],
           results: dict[tuple[str, int], Point], seconds: float, rounds: int) -> None:
    c1 = conns[0]
    cmax = conns[-1]
    direct_p50 = results[("direct", c1)].p50
    print(f"\nwrk -t1, 1 KB body from nginx, {seconds:g} s per point, median of {rounds} "
          f"interleaved round(s), loopback, {os.cpu_count()} cores\n")
    print(f"{'setup':26} {'c':>3} {'rps':>9} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} "
          f"{'+us/hop':>8} {'CPU us/req/hop':>15} {'of which sys':>13} {'CPU s/s per 1k rps':>19}")
    added: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name, _, hops, _ in setups:
        for c in conns:
            p = results[(name, c)]
            plus = (p.p50 - direct_p50) / hops if hops and c == c1 else None
            per_hop = p.cpu_us_per_req / hops if hops else None
            per_1k = p.cpu_us_per_req * 1000 / 1e6 if hops else None
            sys_hop = p.sys_us_per_req / hops if hops else None
            if plus is not None:
                added[name] = plus
            if per_hop is not None and c == cmax:
                cpu[name] = per_hop
            print(f"{name:26} {c:>3} {p.rps:>9.0f} {p.p50:>8.0f} {p.p90:>8.0f} {p.p99:>8.0f} "
                  f"{'' if plus is None else f'{plus:.0f}':>8} "
                  f"{'' if per_hop is None else f'{per_hop:.1f}':>15} "
                  f"{'' if sys_hop is None else f'{sys_hop:.1f}':>13} "
                  f"{'' if per_1k is None else f'{per_1k:.3f}':>19}")
    print("\nratios, sidecar / HAProxy (goal: latency <= 1.2x, requests per CPU-second >= 0.5x)")
    names = [name for name, _, _, _ in setups]
    for s in names:
        if not (s.startswith("sidecar") or s.startswith("trio")) or "mTLS" in s:
            continue
        label = "1 hop" if " 1 hop" in s else "2 hops"
        h = f"haproxy {label}"
        if (s, cmax) not in results or (h, cmax) not in results:
            continue
        lat = added[s] / added[h] if added.get(h, 0) > 0 else float("nan")
        eff = cpu[h] / cpu[s] if cpu.get(s, 0) > 0 else float("nan")
        rps = results[(s, cmax)].rps / results[(h, cmax)].rps
        print(f"  {s:26}: added p50 latency per hop at c={c1}: {lat:.2f}x   "
              f"requests per CPU-second at c={cmax}: {eff:.2f}x   rps at c={cmax}: {rps:.2f}x")
    sm, hm = "sidecar 2 hops mTLS", "haproxy 2 hops mTLS"
    if sm in added and hm in added:
        lat = added[sm] / added[hm] if added[hm] > 0 else float("nan")
        print(f"\n2 hops with mTLS, added p50 latency per hop at c={c1}: sidecar "
              f"{added[sm]:.0f} us, HAProxy {added[hm]:.0f} us -> {lat:.2f}x (goal <= 1.5x)")
        for who in ("sidecar", "haproxy"):
            plain, tls = added.get(f"{who} 2 hops"), added.get(f"{who} 2 hops mTLS")
            if plain is not None and tls is not None:
                print(f"  {who}: mTLS adds {tls - plain:.0f} us per hop over plaintext at c={c1}")


if __name__ == "__main__":
    sys.exit(main())
