"""Clean shutdown on SIGINT/SIGTERM: cancel the owner's scope, let finally blocks run."""

from __future__ import annotations

import logging
import signal

import trio

log = logging.getLogger("mesh")


async def cancel_on_signals(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.warning("%s received: shutting down", signal.Signals(signum).name)
            scope.cancel()
            return
