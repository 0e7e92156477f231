"""`mesh token create`: issue a join token for one service account (printed once)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from actors.ca_config import KvTokenStore, parse_duration
from bus import subjects
from bus.client import Bus, connect
from bus.kv import open_kv
from mesh import tokens
from mesh.cli.apply_cmd import ca_trust_domain
from mesh.cli.common import add_nats_flag, run_trio
from mesh.errors import BusError, ConfigError, MeshError
from mesh.messages import BundleAnnounce, BundleQuery, MessageError
from mesh.spiffe import SpiffeId


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "token", help="join tokens that let a sidecar obtain its first certificate"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser("create", help="issue a token for one namespace/service account")
    add_nats_flag(c)
    c.add_argument("--namespace", "-n", required=True)
    c.add_argument("--service-account", "-s", required=True)
    c.add_argument("--ttl", default="24h", help="validity: 90s, 15m, 24h, 7d (default 24h)")
    c.add_argument("--uses", type=int, default=1, help="redemptions allowed (default 1)")
    c.add_argument("--trust-domain", default="", help="default: the trust domain of the running CA")
    c.set_defaults(func=cmd_create)
    ls = actions.add_parser("list", help="token records (never the secrets)")
    add_nats_flag(ls)
    ls.set_defaults(func=cmd_list)
    rv = actions.add_parser("revoke", help="revoke a token by its id (the part after tmj1.)")
    add_nats_flag(rv)
    rv.add_argument("token_id")
    rv.set_defaults(func=cmd_revoke)


async def trust_domain_of_running_ca(bus: Bus, *, timeout: float = 5.0) -> str:
    """The trust domain of the bundle the CA leader announces, asked of the leader itself
    (a sidecar's NATS user has no JetStream rights, bus/auth.py); between two leaders (a
    failover waits out the lease) the bundle the last one stored in KV, for users that may
    read it (admin, control plane)."""
    try:
        announced = await bus.request(subjects.CA_BUNDLE_GET, BundleQuery(), BundleAnnounce,
                                      timeout=timeout)
        return announced.trust_domain
    except MessageError as exc:
        raise ConfigError(f"the announced trust bundle is unreadable: {exc}") from None
    except BusError as exc:
        asked = exc
    try:  # the stored bundle, read without creating the CA's bucket
        stored = await ca_trust_domain(bus)
    except BusError:
        stored = None  # e.g. a sidecar's user: no JetStream
    if stored is None:
        raise ConfigError(
            f"no CA leader answered for the trust bundle ({asked}) and none is stored; is the "
            "control plane up? (mesh token create: pass --trust-domain to create the token "
            "anyway)"
        )
    return stored


async def create_token(
    bus: Bus, identity: SpiffeId, *, ttl: timedelta = tokens.DEFAULT_TOKEN_TTL, uses: int = 1
) -> tuple[str, tokens.TokenRecord]:
    """Issue a token and store its (hashed) record where the CA redeems it."""
    try:
        text, record = tokens.issue_token(identity, ttl=ttl, max_uses=uses)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    kv = await open_kv(bus, subjects.KV_TOKENS)
    if not await KvTokenStore(kv).put(record, revision=None):
        raise MeshError("token id collision; run the command again")
    return text, record


def cmd_create(args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl, "--ttl")

    async def main() -> int:
        async with connect(args.nats, name="mesh-token", connect_timeout=3.0) as bus:
            td = args.trust_domain or await trust_domain_of_running_ca(bus)
            identity = SpiffeId(td, args.namespace, args.service_account)
            text, record = await create_token(bus, identity, ttl=ttl, uses=args.uses)
        print(text, flush=True)
        print(
            f"join token {record.token_id} for {identity}: {record.max_uses} use(s), expires "
            f"{record.expires().isoformat(timespec='seconds')}. It is shown only this once.",
            file=sys.stderr,
        )
        return 0

    return run_trio(main)


class TokenNotFound(ConfigError):
    pass


def _state(record: tokens.TokenRecord, now: float) -> str:
    if record.revoked:
        return "revoked"
    if now >= record.expires_at:
        return "expired"
    if record.uses >= record.max_uses:
        return "used"
    return "valid"


def cmd_list(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-token", connect_timeout=3.0) as bus:
            store = KvTokenStore(await open_kv(bus, subjects.KV_TOKENS))
            records = []
            for token_id in sorted(await store.kv.keys()):
                got = await store.get(token_id)
                if got is not None:
                    records.append(got[0])
        now = datetime.now(UTC).timestamp()
        print(f"{'ID':<17} {'IDENTITY':<50} {'USES':<6} {'EXPIRES (UTC)':<20} STATE")
        for r in sorted(records, key=lambda r: r.created_at):
            expires = r.expires().strftime("%Y-%m-%d %H:%M:%S")
            uses = f"{r.uses}/{r.max_uses}"
            print(f"{r.token_id:<17} {r.identity.uri:<50} {uses:<6} {expires:<20} {_state(r, now)}")
        return 0

    return run_trio(main)


def cmd_revoke(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with connect(args.nats, name="mesh-token", connect_timeout=3.0) as bus:
            store = KvTokenStore(await open_kv(bus, subjects.KV_TOKENS))
            for _ in range(8):  # CAS: a CA may be redeeming it right now
                got = await store.get(args.token_id)
                if got is None:
                    raise TokenNotFound(f"no join token with id {args.token_id!r}")
                record, revision = got
                if await store.put(tokens.revoke_token(record), revision=revision):
                    print(f"join token {record.token_id} for {record.identity} revoked")
                    return 0
            raise MeshError(f"join token {args.token_id} kept changing; try again")

    return run_trio(main)
