"""Clean shutdown on SIGINT/SIGTERM, or when our supervisor is gone.

Either way the owner's scope is cancelled and every finally block runs.
"""

from __future__ import annotations

import logging
import os
import signal

import trio

from mesh.processes import PARENT_ENV

log = logging.getLogger("mesh")


async def cancel_on_signals(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_parent, scope)
            async for signum in signals:
                # Routine: under `mesh up` it is the supervisor's SIGTERM, already announced.
                log.info("%s received: shutting down", signal.Signals(signum).name)
                scope.cancel()
                nursery.cancel_scope.cancel()
                return


async def watch_parent(scope: trio.CancelScope) -> None:
    """Cancel `scope` when the supervisor that started us (MESH_PARENT_PID) is gone, so a
    supervised child outlives a SIGKILLed supervisor only by about a second."""
    try:
        parent = int(os.environ.get(PARENT_ENV, "0"))
    except ValueError:
        return
    if parent <= 1:
        return
    # The kernel offers no event for a parent's death that trio can wait on; poll.
    while os.getppid() == parent:  # noqa: ASYNC110
        await trio.sleep(1.0)
    log.warning("supervisor (pid %d) is gone: shutting down", parent)
    scope.cancel()
