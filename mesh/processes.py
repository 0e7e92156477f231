"""Child-process plumbing shared by everything that starts processes.

Children get their own session so a Ctrl-C at the terminal reaches only the
parent, which then stops them in order. PR_SET_PDEATHSIG cannot be used: trio
forks children from a worker thread, and the kernel sends that signal when the
*thread* exits (after ~10 s idle), not the parent process. Instead every child
started with `open_child` is registered with an orphan guard (mesh/orphan_guard.py),
a tiny process that reads EOF when its parent dies, SIGKILL included, and then
stops the children left; our own children also watch MESH_PARENT_PID and exit
by themselves (`mesh.signals.cancel_on_signals`).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import trio

PARENT_ENV = "MESH_PARENT_PID"


def child_kwargs(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for trio.lowlevel.open_process / subprocess.Popen."""
    return {"start_new_session": True, "env": {**(env or os.environ), PARENT_ENV: str(os.getpid())}}


class _OrphanGuard:
    """This process's orphan guard, started on first use (one per process)."""

    def __init__(self) -> None:
        self._stdin: IO[bytes] | None = None

    def _pipe(self) -> IO[bytes] | None:
        if self._stdin is None:
            try:
                # Synchronous and from this thread: a few ms, once per process.
                guard = subprocess.Popen(
                    [sys.executable, "-I", str(Path(__file__).with_name("orphan_guard.py"))],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                return None  # no guard: children still stop on a clean exit
            self._stdin = guard.stdin
        return self._stdin

    def tell(self, line: str) -> None:
        pipe = self._pipe()
        if pipe is None:
            return
        try:
            pipe.write(line.encode() + b"\n")
            pipe.flush()
        except OSError:
            self._stdin = None  # the guard died: the next child starts a new one


_guard = _OrphanGuard()


async def open_child(argv: Sequence[str], env: dict[str, str] | None = None,
                     **kwargs: Any) -> trio.Process:
    """Start a child in its own session, stopped by the orphan guard if we die first."""
    process = await trio.lowlevel.open_process(list(argv), **kwargs, **child_kwargs(env))
    _guard.tell(f"+{process.pid}")
    return process


async def terminate(process: trio.Process, grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after `grace` seconds. Safe to call on an exited process."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(grace):
                await process.wait()
            if process.returncode is None:
                process.kill()
        code = await process.wait()
    _guard.tell(f"-{process.pid}")
    return code


async def terminate_all(processes: list[trio.Process], grace: float = 5.0) -> None:
    """SIGTERM every process at once, then SIGKILL whatever is left after `grace` seconds.

    Stopping them together keeps a group's shutdown at one grace period, not one each."""
    with trio.CancelScope(shield=True):
        for p in processes:
            if p.returncode is None:
                p.terminate()
        with trio.move_on_after(grace):
            for p in processes:
                await p.wait()
        for p in processes:
            if p.returncode is None:
                p.kill()
                await p.wait()
            _guard.tell(f"-{p.pid}")


# Planned ports come from below the kernel's ephemeral range: a port picked now and bound
# later by another process can then not be taken meanwhile as the local port of some outgoing
# connection (seen: a demo sidecar whose planned inbound port went to a NATS client socket).
PLANNED_PORTS_FROM = 20000
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a process to bind soon, never handed out
    twice by this process. Races with other processes picking ports are possible but rare."""
    low = _ephemeral_low()
    if low - PLANNED_PORTS_FROM >= 1000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(PLANNED_PORTS_FROM, low)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return int(port)
