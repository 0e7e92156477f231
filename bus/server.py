"""Launch nats-server: an embedded single node, or an N-node local cluster with JetStream.

Readiness is polled, never slept for: every node's `/healthz` must answer 200
and, with JetStream on, `/jsz` must name a meta leader. A 3-node cluster
usually elects one in ~0.35 s but sometimes takes ~5 s (shared/FACTS.md), so
the deadline is generous.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bus.binary import find_nats_server
from bus.http_probe import ProbeError, http_get, http_get_json
from mesh.concurrency import unwrap_single
from mesh.errors import MeshError
from mesh.processes import free_port, open_child, terminate

log = logging.getLogger("mesh.nats")


class NatsServerError(MeshError):
    pass


@dataclass
class NodeSpec:
    name: str
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    http_port: int = 0
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    cluster_name: str = "mesh"
    jetstream: bool = True
    max_payload: int = 8 * 1024 * 1024
    # Run the binary through this, e.g. ["ip", "netns", "exec", "h1"] for a test host.
    exec_prefix: list[str] = field(default_factory=list)
    # Client users and their permissions (bus.auth.authorization_config); empty: no auth.
    authorization: str = ""
    # (user, password) that routes between the nodes of a cluster present to each other, so
    # nothing but a node can join the cluster port and bypass client authorization.
    route_auth: tuple[str, str] | None = None

    def resolve_ports(self) -> None:
        self.port = self.port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)

    def config_text(self) -> str:
        store = self.state_dir / "jetstream"
        lines = [
            f'server_name: "{self.name}"',
            f'listen: "{self.host}:{self.port}"',
            f'http: "{self.host}:{self.http_port}"',
            f"max_payload: {self.max_payload}",
        ]
        if self.jetstream:
            lines.append(
                f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 2GB }}'
            )
        if self.cluster_port:
            routes = ", ".join(f'"{self._route_url(r)}"' for r in self.routes)
            auth = ""
            if self.route_auth:
                user, password = self.route_auth
                auth = f'authorization {{ user: "{user}", password: "{password}" }}, '
            lines.append(
                f'cluster {{ name: "{self.cluster_name}", listen: "{self.host}:{self.cluster_port}", '
                f"{auth}routes: [{routes}] }}"
            )
        if self.authorization:
            lines.append(self.authorization.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _route_url(self, route: str) -> str:
        if not self.route_auth or "@" in route:
            return route
        scheme, _, rest = route.partition("://")
        user, password = self.route_auth
        return f"{scheme}://{user}:{password}@{rest}"


class NatsServer:
    """One nats-server child process, owned by whoever runs `run()` in a nursery."""

    def __init__(self, spec: NodeSpec, binary: Path | None = None) -> None:
        self.spec = spec
        self.binary = binary or find_nats_server()
        self.process: trio.Process | None = None
        self._auto_ports = (spec.port == 0, spec.http_port == 0)
        self._stopping = False
        self.exited = trio.Event()

    @property
    def url(self) -> str:
        return f"nats://{self.spec.host}:{self.spec.port}"

    @property
    def log_path(self) -> Path:
        return self.spec.state_dir / "nats-server.log"

    def log_tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def run(
        self,
        *,
        wait_ready: bool = True,
        task_status: trio.TaskStatus[NatsServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the node; report started once it answers /healthz (or at once if not wait_ready).

        Returns when the node was stopped on purpose (`stop`, `kill`); raises
        NatsServerError if it dies on its own.
        """
        spec = self.spec
        self._stopping = False
        self.exited = trio.Event()
        try:
            for attempt in range(3):
                spec.resolve_ports()
                self.process = await self._spawn()
                if not wait_ready:
                    break
                try:
                    await self.wait_healthy()
                    break
                except NatsServerError as exc:
                    await terminate(self.process)
                    # Ports picked by free_port() can be taken before nats-server binds
                    # them; pick again rather than fail a start-up over a race.
                    if attempt == 2 or not self._repick_ports(str(exc)):
                        raise
                    log.info("nats-server %s: a port was taken meanwhile; retrying", spec.name)
            task_status.started(self)
            assert self.process is not None
            code = await self.process.wait()
            if not self._stopping:
                raise NatsServerError(
                    f"nats-server {spec.name} exited with code {code}; last lines of {self.log_path}:\n"
                    + self.log_tail()
                )
        finally:
            if self.process is not None:
                await terminate(self.process)
            self.exited.set()

    async def _spawn(self) -> trio.Process:
        spec = self.spec
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        conf = spec.state_dir / "nats.conf"
        # It may hold passwords: owner-only, whatever the umask, before any byte is written.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(spec.config_text())
        # A local append-only log file: opening it does not block meaningfully.
        with open(self.log_path, "ab") as logf:  # noqa: ASYNC230
            return await open_child(
                [*spec.exec_prefix, str(self.binary), "-c", str(conf)], stdout=logf, stderr=logf
            )

    def _repick_ports(self, failure: str) -> bool:
        """After a bind clash, forget the ports we picked ourselves. False: nothing to do."""
        if "address already in use" not in failure:
            return False
        auto_port, auto_http = self._auto_ports
        if not (auto_port or auto_http):
            return False
        if auto_port:
            self.spec.port = 0
        if auto_http:
            self.spec.http_port = 0
        return True

    async def wait_healthy(self, timeout: float = 15.0) -> None:
        """Poll /healthz until it answers 200, failing early if the process dies."""
        assert self.process is not None
        with trio.move_on_after(timeout):
            delay = 0.005
            while True:
                if self.process.returncode is not None:
                    raise NatsServerError(
                        f"nats-server {self.spec.name} failed to start (code {self.process.returncode}):\n"
                        + self.log_tail()
                    )
                try:
                    status, _ = await http_get(self.spec.host, self.spec.http_port, "/healthz")
                    if status == 200:
                        return
                except ProbeError:
                    pass
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        raise NatsServerError(
            f"nats-server {self.spec.name} not healthy within {timeout:g} s; log:\n"
            + self.log_tail()
        )

    async def meta_leader(self) -> str:
        """Name of the JetStream meta leader as this node sees it ('' if none)."""
        try:
            status, body = await http_get_json(self.spec.host, self.spec.http_port, "/jsz")
        except ProbeError:
            return ""
        if status != 200 or not isinstance(body, dict):
            return ""
        meta = body.get("meta_cluster") or {}
        return str(meta.get("leader") or "")

    def stop(self) -> None:
        """Graceful stop (SIGTERM); `run()` returns without error."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crash would; `run()` returns without error."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        if self.process and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        self._stopping = True
        if self.process and self.process.returncode is None:
            self.resume()
            self.process.send_signal(sig)


class NatsCluster:
    """N nodes on loopback with full-mesh routes and JetStream."""

    def __init__(
        self,
        size: int,
        state_dir: Path,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        *,
        hosts: Sequence[tuple[str, list[str]]] | None = None,
        authorization: str = "",
        route_auth: tuple[str, str] | None = None,
    ) -> None:
        """`hosts`: one (address, exec prefix) per node, for nodes on separate test hosts;
        each then uses the standard ports. Otherwise `size` nodes share `host`.
        `authorization`, `route_auth`: see NodeSpec (the same on every node)."""
        self._auth = (authorization, route_auth)
        if hosts:
            size = len(hosts)
        if size < 1:
            raise NatsServerError(f"a cluster needs at least one node, not {size}")
        self._args = (size, state_dir, host, binary, list(hosts or []))
        self.nodes: list[NatsServer] = self._build()

    def _build(self) -> list[NatsServer]:
        size, state_dir, host, binary, hosts = self._args
        if hosts:
            addrs = [(h, 4222, 8222, 6222 if size > 1 else 0, prefix) for h, prefix in hosts]
        else:
            cports = [free_port(host) for _ in range(size)] if size > 1 else [0]
            addrs = [(host, 0, 0, cports[i], []) for i in range(size)]
        nodes = []
        for i, (addr, port, http_port, cport, prefix) in enumerate(addrs):
            routes = [f"nats-route://{a[0]}:{a[3]}" for j, a in enumerate(addrs) if j != i and a[3]]
            spec = NodeSpec(
                name=f"n{i + 1}",
                state_dir=state_dir / f"n{i + 1}",
                host=addr,
                port=port,
                http_port=http_port,
                cluster_port=cport,
                routes=routes,
                exec_prefix=list(prefix),
                authorization=self._auth[0],
                route_auth=self._auth[1],
            )
            nodes.append(NatsServer(spec, binary))
        return nodes

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    async def run(
        self,
        *,
        ready_timeout: float = 30.0,
        task_status: trio.TaskStatus[NatsCluster] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        started = False
        for attempt in range(3):
            try:
                with unwrap_single():
                    async with trio.open_nursery() as nursery:
                        for node in self.nodes:
                            await nursery.start(functools.partial(node.run, wait_ready=False))
                        # One deadline for the whole cluster; each wait raises NatsServerError.
                        deadline = trio.current_time() + ready_timeout
                        for node in self.nodes:
                            await node.wait_healthy(max(0.1, deadline - trio.current_time()))
                        await self.wait_meta_leader(
                            self.nodes, max(0.1, deadline - trio.current_time())
                        )
                        log.info("NATS cluster ready: %s", ", ".join(self.urls))
                        started = True
                        task_status.started(self)
                return
            except NatsServerError as exc:
                # Ports picked by free_port() can be taken before the nodes bind them.
                clash = "address already in use" in str(exc) and not self._args[4]
                if started or not clash or attempt == 2:
                    raise
                log.info("NATS cluster: a port was taken meanwhile; retrying with new ports")
                self.nodes = self._build()

    async def wait_meta_leader(self, nodes: Sequence[NatsServer], timeout: float = 30.0) -> str:
        """Wait until every given node agrees on one JetStream meta leader."""
        with trio.move_on_after(timeout):
            while True:
                leaders = {await n.meta_leader() for n in nodes}
                if len(leaders) == 1 and "" not in leaders:
                    return leaders.pop()
                await trio.sleep(0.05)
        raise NatsServerError(f"no JetStream meta leader within {timeout:g} s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
