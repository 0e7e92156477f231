"""Supervise child processes: start, wait for a ready line, restart on crash, stop in order.

A child announces readiness by printing one JSON line with `"event": "ready"`
on stdout (the mesh's own commands do, with `--ready-line`); until then the
supervisor does not report it started. A child that dies is restarted with
exponential backoff; one that cannot become ready at all fails `mesh up` with
its last output, instead of flapping forever.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio

from mesh.errors import MeshError
from mesh.processes import open_child, terminate

log = logging.getLogger("mesh.supervisor")


class ChildFailed(MeshError):
    pass


class ChildProcess:
    """One supervised child. Run with `await nursery.start(child.run)`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        restart: bool = True,
        ready_timeout: float = 30.0,
        startup_attempts: int = 3,
        backoff_base: float = 0.2,
        backoff_cap: float = 10.0,
        ready_port: int | None = None,
        stable_after: float = 10.0,
        withhold_env: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        # Variables of ours this child must not inherit (an app gets no mesh secrets).
        self.withhold_env = tuple(withhold_env)
        self.restart = restart
        self.ready_timeout = ready_timeout
        self.startup_attempts = startup_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        # Apps that print no ready line are ready once they accept on this port.
        self.ready_port = ready_port
        self.stable_after = stable_after
        self.process: trio.Process | None = None
        self.ready_info: dict[str, Any] = {}
        self.restarts = 0
        self._output: deque[str] = deque(maxlen=20)
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def run(
        self, *, task_status: trio.TaskStatus[ChildProcess] = trio.TASK_STATUS_IGNORED
    ) -> None:
        reported = False
        failures = 0
        while not self._stopping:
            ready = trio.Event()
            timed_out = False
            ready_at = 0.0
            env = {k: v for k, v in os.environ.items() if k not in self.withhold_env}
            env.update(self.env or {})
            self.process = await open_child(self.argv, env, stdout=subprocess.PIPE)
            try:
                async with trio.open_nursery() as nursery:
                    assert self.process.stdout is not None
                    nursery.start_soon(self._read_stdout, self.process.stdout, ready)
                    if self.ready_port is not None:
                        nursery.start_soon(self._probe_port, self.ready_port, ready)
                    with trio.move_on_after(self.ready_timeout):
                        await self._wait_ready_or_exit(ready)
                    if ready.is_set():
                        ready_at = trio.current_time()
                        if not reported:
                            reported = True
                            task_status.started(self)
                    elif self.process.returncode is None:
                        timed_out = True  # hung before ready: stop it, count a failure
                        await terminate(self.process)
                        ready.set()  # ends the port probe
                    code = await self.process.wait()
            finally:
                await terminate(self.process)
            if self._stopping:
                return
            # Only a child that stayed up a while has earned a fresh backoff: one that
            # crashes right after starting must not be restarted every 0.2 s forever.
            if ready_at and trio.current_time() - ready_at >= self.stable_after:
                failures = 0
            failures += 1
            if timed_out:
                why = f"was not ready within {self.ready_timeout:g} s"
            elif not ready_at:
                why = "exited before it was ready"
            else:
                why = f"exited with code {code}"
            log.error("%s (pid %s) %s", self.name, self.process.pid, why)
            if not self.restart or (not reported and failures >= self.startup_attempts):
                tail = "\n".join(self._output) or "(no output)"
                raise ChildFailed(f"{self.name} {why} (code {code}); its last output:\n{tail}")
            self.restarts += 1
            await trio.sleep(min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1)))

    async def _wait_ready_or_exit(self, ready: trio.Event) -> None:
        assert self.process is not None
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                assert self.process is not None
                await self.process.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            await ready.wait()
            nursery.cancel_scope.cancel()

    async def _probe_port(self, port: int, ready: trio.Event) -> None:
        delay = 0.01
        while not ready.is_set():
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            await stream.aclose()
            ready.set()

    async def _read_stdout(self, stream: trio.abc.ReceiveStream, ready: trio.Event) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip()
                self._output.append(text)
                if not ready.is_set() and text.startswith("{"):
                    try:
                        info = json.loads(text)
                    except ValueError:
                        info = None
                    if isinstance(info, dict) and info.get("event") == "ready":
                        self.ready_info = info
                        ready.set()
                        continue
                print(f"[{self.name}] {text}", flush=True)

    # Chaos and shutdown hooks.
    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop for good (SIGKILL here plays a crash that nobody restarts)."""
        self._stopping = True
        if self.process and self.process.returncode is None:
            self.resume()
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the current instance; the supervisor restarts it."""
        if self.process and self.process.returncode is None:
            self.process.kill()

    def pause(self) -> None:
        if self.process and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process and self.process.returncode is None:
            os.kill(self.process.pid, signal.SIGCONT)
