"""`mesh apply -f FILE|DIR` (validate, show the diff, apply atomically) and `mesh analyze -f`.

Resources are checked as a whole together with what is stored; the new set is written as one
revision with a compare-and-swap, so an invalid batch, or one that lost a race, changes
nothing. Helpers here are shared by the other config commands (get, delete, rollback, route).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import trio

from bus import subjects
from bus.client import Bus, connect
from bus.errors import BusTimeout, KVError, NoResponders
from bus.kv import open_kv
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import ConfigError, MeshError
from mesh.messages import (
    BundleAnnounce,
    ConfigStatus,
    ConfigStatusRequest,
    MessageError,
    decode_as,
)
from mesh.resources import (
    ResourceSet,
    check_trust_domain,
    diff,
    load_paths,
    merged,
    validate_set,
)
from mesh.resources_store import Revision, Store

Change = Callable[[Revision], tuple[ResourceSet, str]]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "apply", help="validate resource files, show the diff and apply them atomically"
    )
    p.add_argument(
        "-f",
        "--file",
        action="append",
        required=True,
        metavar="FILE|DIR",
        help="a YAML file or a directory of them (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="validate and show the diff only")
    p.add_argument("--note", default="", help="a note stored with the revision")
    add_wait_flag(p)
    add_nats_flag(p)
    p.set_defaults(func=cmd_apply)

    a: argparse.ArgumentParser = sub.add_parser(
        "analyze", help="validate resource files (with what is stored) without applying"
    )
    a.add_argument("-f", "--file", action="append", required=True, metavar="FILE|DIR")
    a.add_argument(
        "--offline",
        action="store_true",
        help="check the files alone, without reading the stored configuration",
    )
    add_nats_flag(a)
    a.set_defaults(func=cmd_analyze)


def add_wait_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after writing, wait until every sidecar has ACKed the new revision",
    )


async def ca_trust_domain(bus: Bus) -> str | None:
    """The trust domain the CA leader announced (its signed bundle in KV), or None when no CA
    has run on this NATS yet: then there is nothing to compare with, and the CA checks the
    MeshConfig itself when it starts."""
    try:
        # create=False: a CLI must not create the CA's bucket with its own replica count.
        kv = await open_kv(bus, subjects.KV_CA, create=False)
    except KVError:
        return None
    entry = await kv.get("bundle")
    if entry is None:
        return None
    try:
        return decode_as(entry.value, BundleAnnounce).trust_domain
    except MessageError as exc:
        raise ConfigError(
            f"the CA's stored trust bundle is unreadable ({exc}), so MeshConfig "
            "spec.trust_domain cannot be checked; is the control plane of another version?"
        ) from None


async def check_against_ca(bus: Bus, new: ResourceSet, stored: ResourceSet) -> None:
    # Only a trust domain that this change sets or changes is checked: an unreadable bundle
    # (another version's control plane) must not block unrelated changes, e.g. a rollback.
    key = ("MeshConfig", "default")
    wanted = new[key].spec.get("trust_domain") if key in new else None
    before = stored[key].spec.get("trust_domain") if key in stored else None
    if wanted is None or wanted == before:
        return
    td = await ca_trust_domain(bus)
    if td is not None:
        check_trust_domain(new, td, stored=stored)


async def change_config(
    args: argparse.Namespace, change: Change, *, dry_run: bool = False, out: Any = None
) -> int:
    """Read the stored set, compute the new one, show the diff, CAS-write it; 0 on success."""
    out = out or sys.stdout
    async with connect(args.nats, name="mesh-cli", connect_timeout=3.0) as bus:
        store = await Store.open(bus)
        current = await store.current()
        new, note = change(current)
        validate_set(new)
        await check_against_ca(bus, new, current.resources)
        lines = diff(current.resources, new)
        if not lines:
            print(f"no changes (revision {current.revision})", file=out)
            revision = current.revision
        elif dry_run:
            print("\n".join(lines), file=out)
            print("dry run: nothing written", file=out)
            return 0
        else:
            print("\n".join(lines), file=out)
            revision = await store.write(new, current.revision, note)
            print(f"applied: revision {revision}", file=out)
        wait = getattr(args, "wait", 0.0)
        if wait > 0:
            await wait_synced(bus, revision, wait, out)
        return 0


async def fetch_status(
    bus: Bus, timeout: float = 3.0, *, service: str = "", rows: bool = True
) -> ConfigStatus:
    """The control plane's status; every row, fetched page by page (rows=False: counts only)."""
    page = 1000 if rows else 0
    try:
        st = await bus.request(
            subjects.CONFIG_STATUS,
            ConfigStatusRequest(service=service, limit=page),
            ConfigStatus,
            timeout=timeout,
        )
    except (NoResponders, BusTimeout):
        raise ConfigError(
            f"no control plane answered on {bus.connected_url} within {timeout:g} s: is "
            "`mesh controlplane` (or `mesh up`) running against this NATS?"
        ) from None
    sidecars = list(st.sidecars)
    while rows and len(sidecars) < st.total:
        more = await bus.request(
            subjects.CONFIG_STATUS,
            ConfigStatusRequest(service=service, offset=len(sidecars), limit=page),
            ConfigStatus,
            timeout=timeout,
        )
        if not more.sidecars:
            break
        sidecars.extend(more.sidecars)
    return dataclasses.replace(st, sidecars=sidecars)


async def wait_synced(bus: Bus, revision: int, timeout: float, out: Any) -> None:
    """Poll the control plane until it compiled `revision` and every sidecar ACKed it."""
    last: ConfigStatus | None = None
    with trio.move_on_after(timeout):
        while True:
            try:
                last = await fetch_status(bus, timeout=min(2.0, timeout))
            except MeshError:
                last = None
            if (
                last is not None
                and last.revision >= revision
                and all(s["status"] == "SYNCED" for s in last.sidecars)
            ):
                print(f"synced: {len(last.sidecars)} sidecar(s) run revision {revision}", file=out)
                return
            await trio.sleep(0.1)
    behind = [
        f"{s['instance']} {s['status']} {s['reason']}".strip()
        for s in (last.sidecars if last else [])
        if s["status"] != "SYNCED"
    ]
    raise ConfigError(
        f"revision {revision} was written, but not every sidecar ACKed it within "
        f"{timeout:g} s: {'; '.join(behind) or 'no answer from the control plane'}"
        " (see `mesh status`)"
    )


def cmd_apply(args: argparse.Namespace) -> int:
    applied = load_paths(args.file)  # every file checked before anything is read or written

    def change(current: Revision) -> tuple[ResourceSet, str]:
        note = args.note or "apply " + " ".join(args.file)
        return merged(current.resources, applied), note

    async def main() -> int:
        return await change_config(args, change, dry_run=args.dry_run)

    return run_trio(main)


def cmd_analyze(args: argparse.Namespace) -> int:
    applied = load_paths(args.file)
    if args.offline:
        validate_set({r.key: r for r in applied})
        print(f"ok: {len(applied)} resource(s) are valid on their own")
        return 0

    async def main() -> int:
        async with connect(args.nats, name="mesh-cli", connect_timeout=3.0) as bus:
            current = await (await Store.open(bus)).current()
            new = merged(current.resources, applied)
            validate_set(new)
            await check_against_ca(bus, new, current.resources)
        lines = diff(current.resources, new)
        print("\n".join(lines) if lines else "no changes")
        print(f"ok: {len(applied)} resource(s) are valid with revision {current.revision}")
        return 0

    return run_trio(main)
