"""Child-process plumbing shared by everything that starts processes.

Children get their own session so a Ctrl-C at the terminal reaches only the
parent, which then stops them in order; and the kernel sends them SIGTERM if
the parent dies without cleaning up, so no test or crash leaves one behind.
"""

from __future__ import annotations

import ctypes
import signal
import socket
from typing import Any

import trio

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: best effort only
        pass


def child_kwargs() -> dict[str, Any]:
    """Keyword arguments for trio.lowlevel.open_process / subprocess.Popen."""
    return {"start_new_session": True, "preexec_fn": _die_with_parent}


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
    return code


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Races are possible but rare on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
