"""CA actor configuration (environment), the operator secret, and the KV-backed token store.

Environment of each control-plane replica (the CA actor reads it at start):

=========================  =====================================================================
``MESH_CA_SECRET``         operator secret sealing the CA key in KV (>= 16 bytes), or
``MESH_CA_SECRET_FILE``    a file holding it (first line). One of the two is required.
``MESH_TRUST_DOMAIN``      trust domain of a freshly generated root (default ``mesh.local``)
``MESH_CA_LEAF_TTL``       leaf lifetime: ``24h`` (default), ``90m``, ``300s``, or seconds;
                           an applied MeshConfig ``cert_ttl_hours`` overrides it
``MESH_CA_CERT``           operator CA certificate (+ chain, PEM) instead of a generated root
``MESH_CA_KEY``            its private key (PEM); ``MESH_CA_KEY_PASSWORD`` if encrypted
``MESH_CA_BUNDLE``         roots (PEM) when ``MESH_CA_CERT`` is an intermediate without its root
``MESH_KV_REPLICAS``       JetStream replicas of the CA/token/lease buckets (default 1)
=========================  =====================================================================

The secret never travels on NATS: every CA replica gets it from its own environment or file.

The applied MeshConfig (the resource set in KV ``mesh_config/resources``, the one the config
actor compiles from) is the user's word and wins over the environment for the leaf lifetime:
``meshconfig_leaf_ttl`` reads it. Its ``trust_domain`` is only checked against the CA's root.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from bus.errors import KVConflict
from bus.kv import KV
from mesh import pki_ca
from mesh.errors import ConfigError
from mesh.pki_ca import DEFAULT_LEAF_TTL
from mesh.pki_seal import MIN_SECRET_BYTES
from mesh.resources import ResourceSet
from mesh.tokens import TokenRecord

log = logging.getLogger("mesh.ca")

__all__ = [
    "SECRET_FILE_NAME",
    "CaConfig",
    "CaConfigError",
    "KvTokenStore",
    "ensure_embedded_secret",
    "meshconfig_leaf_ttl",
    "parse_duration",
]

DEFAULT_TRUST_DOMAIN = "mesh.local"
SECRET_FILE_NAME = "ca-secret"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class CaConfigError(ConfigError):
    """The CA cannot start: missing operator secret, unreadable file, bad duration."""


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """``90s``, ``15m``, ``24h``, ``7d`` or plain seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise CaConfigError(f"{what} {text!r} is not a duration: use e.g. 90s, 15m, 24h, 7d")
    return timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CaConfigError(f"{what} {path}: {exc.strerror or exc}") from None


def _secret_from_file(path: str) -> bytes:
    data = _read(path, "operator secret file")
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("operator secret file %s is readable by others (chmod 600 it)", path)
    except OSError:
        pass
    lines = data.splitlines()
    return lines[0].strip() if lines else b""


@dataclass(frozen=True)
class CaConfig:
    secret: bytes
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    leaf_ttl: timedelta = DEFAULT_LEAF_TTL
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    bundle_pem: bytes | None = None
    key_password: bytes | None = None
    lease_ttl: float = 3.0
    announce_interval: float = 10.0
    kv_replicas: int = 1
    workers: int = 32
    # A KV watch can die silently when the server restarts; the stored MeshConfig is also
    # read this often so a changed cert_ttl_hours is never missed for long.
    config_poll: float = 5.0

    def __repr__(self) -> str:  # never show the secret or the key
        return (
            f"CaConfig(trust_domain={self.trust_domain!r}, leaf_ttl={self.leaf_ttl}, "
            f"operator_ca={self.cert_pem is not None})"
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CaConfig:
        env = os.environ if env is None else env
        if env.get("MESH_CA_SECRET"):
            secret = env["MESH_CA_SECRET"].encode()
            where = "MESH_CA_SECRET"
        elif env.get("MESH_CA_SECRET_FILE"):
            secret = _secret_from_file(env["MESH_CA_SECRET_FILE"])
            where = f"MESH_CA_SECRET_FILE ({env['MESH_CA_SECRET_FILE']})"
        else:
            raise CaConfigError(
                "the CA needs an operator secret to seal its signing key in KV: set "
                "MESH_CA_SECRET or MESH_CA_SECRET_FILE (at least 16 bytes) on every "
                "control-plane replica; `mesh up` generates one into its state dir"
            )
        if len(secret) < MIN_SECRET_BYTES:
            raise CaConfigError(
                f"operator secret from {where} is {len(secret)} bytes; at least "
                f"{MIN_SECRET_BYTES} are required"
            )
        cert = env.get("MESH_CA_CERT")
        key = env.get("MESH_CA_KEY")
        if bool(cert) != bool(key):
            raise CaConfigError("MESH_CA_CERT and MESH_CA_KEY must be given together")
        bundle = env.get("MESH_CA_BUNDLE")
        password = env.get("MESH_CA_KEY_PASSWORD")
        ttl = parse_duration(env.get("MESH_CA_LEAF_TTL", "24h"), "MESH_CA_LEAF_TTL")
        if ttl < pki_ca.MIN_LEAF_TTL:
            raise CaConfigError(
                f"MESH_CA_LEAF_TTL {env['MESH_CA_LEAF_TTL']!r} is below the minimum leaf "
                f"lifetime of {pki_ca.MIN_LEAF_TTL}"
            )
        try:
            replicas = int(env.get("MESH_KV_REPLICAS", "1"))
        except ValueError:
            raise CaConfigError("MESH_KV_REPLICAS must be an integer (1, 3 or 5)") from None
        return cls(
            secret=secret,
            trust_domain=env.get("MESH_TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN),
            leaf_ttl=ttl,
            cert_pem=_read(cert, "MESH_CA_CERT") if cert else None,
            key_pem=_read(key, "MESH_CA_KEY") if key else None,
            bundle_pem=_read(bundle, "MESH_CA_BUNDLE") if bundle else None,
            key_password=password.encode() if password else None,
            kv_replicas=replicas,
        )


def meshconfig_leaf_ttl(resources: ResourceSet) -> timedelta | None:
    """MeshConfig ``spec.cert_ttl_hours`` of an (already validated) resource set, if set."""
    config = resources.get(("MeshConfig", "default"))
    hours = config.spec.get("cert_ttl_hours") if config is not None else None
    return None if hours is None else timedelta(hours=hours)


def ensure_embedded_secret(state_dir: Path) -> tuple[Path, bool]:
    """The operator secret of an embedded `mesh up`: ``<state_dir>/ca-secret``, mode 0600.

    Returns (path, created). Created once with 32 random bytes; reused afterwards, so the CA
    sealed in the embedded NATS's KV opens again after a restart.
    """
    path = state_dir / SECRET_FILE_NAME
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return path, False
    try:
        os.write(fd, secrets.token_urlsafe(32).encode() + b"\n")
    finally:
        os.close(fd)
    return path, True


class KvTokenStore:
    """``mesh.tokens.TokenStore`` on a JetStream KV bucket (key: token id, CAS on revision)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def get(self, token_id: str) -> tuple[TokenRecord, int] | None:
        entry = await self.kv.get(token_id)
        if entry is None:
            return None
        return TokenRecord.from_bytes(entry.value), entry.revision

    async def put(self, record: TokenRecord, *, revision: int | None) -> bool:
        try:
            if revision is None:
                await self.kv.create(record.token_id, record.to_bytes())
            else:
                await self.kv.update(record.token_id, record.to_bytes(), revision)
        except KVConflict:
            return False
        return True

    async def delete(self, token_id: str) -> None:
        await self.kv.delete(token_id)


def secret_env_for_children(state_dir: Path) -> dict[str, str]:
    """Environment for `mesh up`'s control-plane replicas: the operator's secret if set, else
    a generated one in ``<state_dir>/ca-secret`` (0600), announced on stderr when created."""
    if os.environ.get("MESH_CA_SECRET") or os.environ.get("MESH_CA_SECRET_FILE"):
        return {}
    path, created = ensure_embedded_secret(state_dir)
    if created:
        print(
            f"mesh up: generated the CA operator secret into {path} (mode 0600); the CA key "
            "stored in NATS is sealed with it: keep it, or set MESH_CA_SECRET_FILE yourself",
            file=sys.stderr,
            flush=True,
        )
    return {"MESH_CA_SECRET_FILE": str(path.resolve())}
