"""Leader election on real NATS: one holder at a time, handover on release, takeover on death."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from actors.lease import Lease, LeaseLost, LeaseTerm, open_leases
from bus.client import connect
from bus.server import NatsServer
from mesh.processes import child_kwargs, terminate

HERE = Path(__file__).parent


async def test_two_holders_one_leader_and_handover_on_release(nats_server: NatsServer) -> None:
    async with connect(nats_server.url) as bus:
        kv = await open_leases(bus)
        # ttl 3 s: a release must hand over well before the ttl could expire (< 2.5 s below).
        a, b = Lease(kv, "single", "a", ttl=3.0), Lease(kv, "single", "b", ttl=3.0)
        leading: list[str] = []
        overlap = False
        a_leads, b_leads, stop_a = trio.Event(), trio.Event(), trio.Event()

        async def work(name: str, started: trio.Event, stop: trio.Event | None) -> None:
            nonlocal overlap
            overlap = overlap or bool(leading)
            leading.append(name)
            started.set()
            try:
                if stop is None:
                    await trio.sleep_forever()
                await stop.wait()
            finally:
                leading.remove(name)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(a.run_as_leader, lambda t: work("a", a_leads, stop_a))
                await a_leads.wait()
                await nursery.start(b.run_as_leader, lambda t: work("b", b_leads, None))
                # b keeps competing through several of a's heartbeats without winning.
                with trio.move_on_after(1.5):
                    await b_leads.wait()
                assert leading == ["a"] and not b_leads.is_set()
                assert await b.current_holder() == "a"
                t0 = trio.current_time()
                stop_a.set()  # a returns: clean release, b takes over on its next poll
                await b_leads.wait()
                assert trio.current_time() - t0 < 2.5
                assert leading == ["b"] and not overlap
                nursery.cancel_scope.cancel()


async def test_leader_loses_work_when_taken_over(nats_server: NatsServer) -> None:
    """A holder whose CAS heartbeat conflicts (someone else wrote) has its work cancelled."""
    async with connect(nats_server.url) as bus:
        kv = await open_leases(bus)
        lease = Lease(kv, "stolen", "a", ttl=0.6)
        cancelled = False
        with trio.fail_after(5), pytest.raises(LeaseLost, match="taken over"):
            async with lease.held() as term:
                entry = await kv.get("stolen")
                assert entry is not None and entry.revision == term.revision
                await kv.put("stolen", b"intruder")
                try:
                    await trio.sleep_forever()
                except trio.Cancelled:
                    cancelled = True
                    raise
        assert cancelled


async def test_standby_takes_over_from_a_killed_holder(nats_server: NatsServer) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(HERE / "lease_holder.py"), nats_server.url, "ca", "victim", "1.5"],
        stdout=subprocess.PIPE,
        **child_kwargs(),
    )
    try:
        assert proc.stdout is not None
        with trio.fail_after(15):
            buf = b""
            while b'"ready"' not in buf:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"holder exited: {buf!r}"
                buf += chunk
        async with connect(nats_server.url) as bus:
            standby = Lease(await open_leases(bus), "ca", "standby", ttl=1.5)
            assert await standby.current_holder() == "victim"
            won: list[LeaseTerm] = []
            async with trio.open_nursery() as nursery:

                async def compete() -> None:
                    async with standby.held() as term:
                        won.append(term)

                nursery.start_soon(compete)
                # While the holder lives, the standby does not win.
                with trio.move_on_after(1.0):
                    while not won:
                        await trio.sleep(0.05)
                assert not won
                proc.kill()  # no release: the standby must wait out the ttl
                killed_at = trio.current_time()
                with trio.fail_after(5):
                    while not won:
                        await trio.sleep(0.05)
                took = trio.current_time() - killed_at
            assert 0.8 < took < 3.5, took
    finally:
        await terminate(proc)


async def test_paused_leader_steps_down_when_it_resumes(nats_server: NatsServer) -> None:
    """SIGSTOP the holder (a partition or a long pause): the standby takes over; on SIGCONT
    the old holder's work is cancelled and it does not take the lease back."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(HERE / "lease_holder.py"), nats_server.url, "ca", "paused", "1.0"],
        stdout=subprocess.PIPE,
        **child_kwargs(),
    )
    assert proc.stdout is not None
    out = b""

    async def read_until(marker: bytes, count: int = 1) -> None:
        nonlocal out
        assert proc.stdout is not None
        while out.count(marker) < count:
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, f"holder exited: {out!r}"
            out += chunk

    try:
        with trio.fail_after(15):
            await read_until(b'"ready"')
        async with connect(nats_server.url) as bus:
            standby = Lease(await open_leases(bus), "ca", "standby", ttl=1.0)
            proc.send_signal(signal.SIGSTOP)
            with trio.fail_after(10):
                async with standby.held():
                    proc.send_signal(signal.SIGCONT)
                    await read_until(b'"stopped"')
                    assert b'"valid": false' in out
                    # It competes again but cannot win while the standby heartbeats.
                    with trio.move_on_after(1.0):
                        await read_until(b'"ready"', count=2)
                    assert out.count(b'"ready"') == 1
                    assert await standby.current_holder() == "standby"
    finally:
        proc.send_signal(signal.SIGCONT)
        await terminate(proc)


async def test_a_late_landing_heartbeat_of_our_own_is_not_a_takeover(
    nats_server: NatsServer,
) -> None:
    """A heartbeat the holder stopped waiting for may land later: the next CAS then conflicts
    with the holder's *own* record, which must not count as losing the lease."""
    async with connect(nats_server.url) as bus:
        kv = await open_leases(bus)
        lease = Lease(kv, "late", "a", ttl=0.6)
        with trio.fail_after(5):
            async with lease.held() as term:
                stale = term.revision
                await kv.update("late", lease._value(), stale)  # exactly what its heartbeat writes
                while term.revision <= stale + 1:  # the heartbeat moved past the late write
                    await trio.sleep(0.05)
                assert term.valid() and await lease.current_holder() == "a"


async def test_two_processes_with_one_holder_name_do_not_co_lead(nats_server: NatsServer) -> None:
    """A second `mesh up` against the same NATS names its replica cp-1 too: it must wait."""
    import actors.lease as lease_module

    async with connect(nats_server.url) as bus:
        kv = await open_leases(bus)
        first = Lease(kv, "dup", "cp-1", ttl=5.0)
        async with first.held():
            other = Lease(kv, "dup", "cp-1", ttl=5.0)
            other._identity = "cp-1#" + "0" * 8  # as another process's would differ
            assert other._identity != first._identity and lease_module._PROCESS_ID
            with trio.move_on_after(1.0) as waited:
                await other.acquire()
            assert waited.cancelled_caught, "a same-named holder in another process took the lease"
