"""`mesh sidecar` identity flags: get an SVID from the CA before serving, then mTLS.

    mesh sidecar ... --nats URLS --identity spiffe://TD/ns/NS/sa/SA --token-file F \\
        [--mtls STRICT|PERMISSIVE|DISABLE] [--identity-timeout 30] [--ca-nats URLS]

(`--namespace NS --service-account SA` instead of `--identity`: the trust domain is the
running CA's.) The identity agent runs on its own NATS connection; the sidecar reports ready
only once the first certificate is installed, and exits with one line if none comes in time.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mesh.errors import ConfigError, IdentityError
from mesh.snapshot import MTLS_MODES
from mesh.spiffe import SpiffeId, parse_spiffe_id

__all__ = ["IdentityConfig", "add_identity_flags", "identity_config", "run_identity"]


@dataclass(frozen=True)
class IdentityConfig:
    servers: tuple[str, ...]
    identity: SpiffeId | None  # None: namespace/service account with the CA's trust domain
    namespace: str
    service_account: str
    token: str
    mode: str
    timeout: float
    name: str


def add_identity_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("identity (mTLS between sidecars; needs --nats)")
    g.add_argument("--identity", help="this workload's SPIFFE ID, "
                                      "spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT")
    g.add_argument("--namespace", help="instead of --identity: the namespace (the trust "
                                       "domain is the running CA's)")
    g.add_argument("--service-account", help="with --namespace (default: --service)")
    g.add_argument("--token", help="join token from `mesh token create` (visible in ps: "
                                   "prefer --token-file)")
    g.add_argument("--token-file", type=Path, help="file holding the join token")
    g.add_argument("--mtls", type=str.upper, choices=MTLS_MODES,
                   help="inbound mode: STRICT (default with an identity), PERMISSIVE "
                        "(plaintext too), DISABLE (no mTLS either way); the snapshot's "
                        "inbound.mtls wins when set")
    g.add_argument("--ca-nats", help="NATS URL(s) for certificates only (default: --nats); "
                                     "with --config and no --nats, snapshots stay file-only")
    g.add_argument("--identity-timeout", type=float, default=30.0,
                   help="seconds to wait for the first certificate before giving up")


def identity_config(args: argparse.Namespace, name: str) -> IdentityConfig | None:
    """None when no identity flag is given (plaintext sidecar, as before)."""
    if not (args.identity or args.namespace or args.token or args.token_file
            or args.ca_nats):
        if args.mtls not in (None, "DISABLE"):
            raise ConfigError(f"--mtls {args.mtls} needs an identity: give --identity (or "
                              "--namespace) and --token or --token-file")
        return None
    nats = args.ca_nats or args.nats
    if not nats:
        raise ConfigError("--identity needs --nats (or --ca-nats): certificates come from the "
                          "CA over NATS")
    if args.identity and args.namespace:
        raise ConfigError("give --identity or --namespace/--service-account, not both")
    ident: SpiffeId | None = None
    if args.identity:
        try:
            ident = parse_spiffe_id(args.identity)
        except IdentityError as exc:
            raise ConfigError(f"--identity {args.identity!r}: {exc}") from None
    elif not args.namespace:
        raise ConfigError("give --identity spiffe://TD/ns/NS/sa/SA or --namespace NS")
    if bool(args.token) == bool(args.token_file):
        raise ConfigError("give exactly one of --token and --token-file (a join token from "
                          "`mesh token create`)")
    token = args.token or ""
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file {args.token_file}: cannot read: {exc.strerror}"
                              ) from None
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
    if args.identity_timeout <= 0:
        raise ConfigError("--identity-timeout must be positive")
    from bus.client import BusOptions

    return IdentityConfig(
        servers=BusOptions.parse_servers(nats), identity=ident,
        namespace=ident.namespace if ident else args.namespace,
        service_account=(ident.service_account if ident
                         else args.service_account or args.service),
        token=token, mode=args.mtls or "STRICT", timeout=args.identity_timeout,
        name=f"{name}-{os.getpid()}")


async def run_identity(cfg: IdentityConfig, sidecar: Any, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the identity agent; started once the first certificate is in and handed to the
    sidecar (`Sidecar.use_identity`), so the sidecar's listeners start with mTLS."""
    from bus.client import connect
    from mesh.cli.token_cmd import trust_domain_of_running_ca
    from sidecar.identity import IdentityAgent

    async with connect(cfg.servers) as bus, trio.open_nursery() as nursery:
        ident = cfg.identity
        if ident is None:
            td = await trust_domain_of_running_ca(bus)
            ident = SpiffeId(td, cfg.namespace, cfg.service_account)
        # STRICT is enforced per connection by the sidecar (sidecar/mtls.py), so the
        # server context accepts a missing client certificate and the mode can follow the
        # snapshot without a new context.
        agent = IdentityAgent(ident, token=cfg.token, name=cfg.name, permissive=True)
        await nursery.start(agent.run, bus)
        with trio.move_on_after(cfg.timeout) as waited:
            await agent.wait_ready()
        if waited.cancelled_caught:
            raise IdentityError(
                f"no certificate for {ident} from the CA within {cfg.timeout:g}s (last error: "
                f"{agent.last_error or 'no answer'}); is the control plane running, and is "
                f"the join token for this identity?")
        sidecar.use_identity(agent, cfg.mode)
        task_status.started()
