"""Who may do what on the bus: roles, their NATS permissions, and credential files.

The mesh's NATS users are plain user/password users of nats-server's config file
(``authorization { users = [...] }``): well supported by every nats-server, no account
JWTs to operate, and nats-py needs no extra package. Each user has one *role*:

* ``controlplane``: the replicas. Everything they need: the ``mesh.>`` subjects, JetStream
  (KV buckets), and replies to requests they receive (``allow_responses``).
* ``sidecar``: publishes its telemetry, spans, access logs, config ACKs and heartbeats and its
  CSR requests; receives config pushes, bundle announcements and ``mesh certs`` queries.
  Of JetStream only a read of the one key ``mesh_ca/bundle`` (no KV writes, no other reads); no CA commands; cannot
  subscribe to ``mesh.ca.sign`` (join tokens in flight) nor to any inbox but its own.
* ``admin``: the CLI (apply, rollback, token, ca rotate, certs, top...). JetStream and
  ``mesh.>``, but it cannot publish bundle announcements or config pushes (only the control
  plane speaks for the CA and the config actor) nor read ``mesh.ca.sign``.

Replies: a requester subscribes to its inbox. nats-py takes a custom ``inbox_prefix``, so every
user gets ``_INBOX.<user>`` and may subscribe only under it: a sidecar cannot read another
user's replies. Responders (the control plane) answer through ``allow_responses`` instead of a
blanket right to publish on ``_INBOX.>``.

A credential file is JSON, mode 0600: ``{"user", "password", "role", "inbox_prefix"}``. The bus
also accepts a NATS ``.creds`` file (user JWT + nkey seed) for operators of a foreign cluster
running in operator mode. Secrets never go on a command line or into a log: children get the
*path* in ``MESH_NATS_CREDS``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bus import subjects
from mesh.errors import ConfigError

__all__ = [
    "CREDS_ENV",
    "ROLES",
    "Credentials",
    "CredentialsError",
    "Permissions",
    "authorization_config",
    "ensure_credentials",
    "load_credentials",
    "permissions_for",
]

CREDS_ENV = "MESH_NATS_CREDS"
ROLES = ("controlplane", "sidecar", "admin")
CREDS_DIR = "nats-creds"
_JWT_MARK = "-----BEGIN NATS USER JWT-----"


class CredentialsError(ConfigError):
    """A credential file is missing, unreadable or malformed. The text names the file."""


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    deny_subscribe: tuple[str, ...] = ()
    allow_responses: bool = False


def inbox_prefix(user: str) -> str:
    """The only inbox subtree ``user`` may subscribe to (nats-py's ``inbox_prefix``)."""
    return f"_INBOX.{subjects.token(user)}"


# JetStream as the KV calls use it: API requests (bucket info, create, direct/msg get, consumer
# create for watch and history), KV writes (a publish on $KV.<bucket>.<key>), flow-control
# replies of ordered consumers, acks.
_JETSTREAM = ("$JS.API.>", "$KV.>", "$JS.FC.>", "$JS.ACK.>")


def permissions_for(role: str, user: str) -> Permissions:
    """The exact permissions of one user of ``role``; subjects come from bus/subjects.py."""
    inbox = inbox_prefix(user) + ".>"
    mesh_all = f"{subjects.PREFIX}.>"
    if role == "controlplane":
        return Permissions(
            publish=(mesh_all, *_JETSTREAM),
            subscribe=(mesh_all, inbox),
            allow_responses=True,
        )
    if role == "sidecar":
        return Permissions(
            publish=(
                subjects.CA_SIGN,
                subjects.CERTS_STATUS_ALL,
                subjects.CONFIG_FULL,
                subjects.CONFIG_ACK,
                subjects.CONFIG_HEARTBEAT,
                subjects.TELEMETRY_ALL,
                subjects.SPANS_ALL,
                subjects.ACCESSLOG_ALL,
                # Read-only, one key: the trust domain of `mesh sidecar --namespace` comes
                # from the stored bundle (a direct get names the key in its subject).
                f"$JS.API.STREAM.INFO.KV_{subjects.KV_CA}",
                f"$JS.API.DIRECT.GET.KV_{subjects.KV_CA}.$KV.{subjects.KV_CA}.bundle",
            ),
            subscribe=(
                subjects.CA_BUNDLE,
                subjects.CERTS_QUERY,
                subjects.CONFIG_PUSH_ALL,
                inbox,
            ),
        )
    if role == "admin":
        return Permissions(
            publish=(mesh_all, *_JETSTREAM),
            subscribe=(mesh_all, inbox),
            deny_publish=(subjects.CA_BUNDLE, subjects.CONFIG_PUSH_ALL, subjects.CA_SIGN),
            deny_subscribe=(subjects.CA_SIGN,),
        )
    raise CredentialsError(f"unknown NATS role {role!r}: expected one of {', '.join(ROLES)}")


@dataclass(frozen=True, slots=True)
class Credentials:
    """One NATS user. ``repr`` never shows the password."""

    user: str
    password: str
    role: str
    inbox_prefix: str
    path: Path | None = None

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, role={self.role!r}, path={self.path})"

    def describe(self) -> str:
        where = f" from {self.path}" if self.path else ""
        role = f" (role {self.role})" if self.role else ""
        return f"user {self.user!r}{role}{where}"

    def connect_options(self) -> dict[str, Any]:
        """nats-py ``connect()`` keyword arguments."""
        return {"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix}

    def to_json(self) -> str:
        return json.dumps(
            {
                "user": self.user,
                "password": self.password,
                "role": self.role,
                "inbox_prefix": self.inbox_prefix,
            },
            indent=2,
        )


def is_nats_creds_file(path: Path) -> bool:
    """True for a NATS ``.creds`` file (JWT + seed), which nats-py reads itself."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _JWT_MARK in f.read(4096)
    except OSError:
        return False


def load_credentials(path: str | Path) -> Credentials:
    """Read a mesh credential file; every problem is a CredentialsError naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise CredentialsError(
            f"NATS credentials file {p} does not exist (pass --creds FILE or set {CREDS_ENV})"
        ) from None
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        # Never quote the content: it is a secret.
        raise CredentialsError(
            f"NATS credentials file {p} is not a mesh credentials file (JSON with user and "
            "password) nor a NATS .creds file"
        ) from None
    if not isinstance(data, dict):
        raise CredentialsError(f"NATS credentials file {p}: expected a JSON object")
    user, password = data.get("user"), data.get("password")
    if not isinstance(user, str) or not user or not isinstance(password, str) or not password:
        raise CredentialsError(f"NATS credentials file {p}: 'user' and 'password' are required")
    role = data.get("role", "")
    prefix = data.get("inbox_prefix") or "_INBOX"
    if not isinstance(role, str) or not isinstance(prefix, str):
        raise CredentialsError(f"NATS credentials file {p}: 'role' and 'inbox_prefix' are strings")
    return Credentials(user, password, role, prefix, p)


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` mode 0600; never follow a symlink, never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_credentials(state_dir: Path, users: Iterable[tuple[str, str]]) -> dict[str, Credentials]:
    """Credentials of ``(user, role)`` pairs under ``<state_dir>/nats-creds/<user>.json``:
    read if present, else generated (32 random bytes) and written mode 0600. Returns them by
    user name. The directory is 0700."""
    folder = state_dir / CREDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    out: dict[str, Credentials] = {}
    for user, role in users:
        subjects.token(user)
        permissions_for(role, user)  # unknown role: fail here, not in nats-server
        path = folder / f"{user}.json"
        if not path.exists():
            creds = Credentials(user, secrets.token_urlsafe(32), role, inbox_prefix(user), path)
            try:
                _write_private(path, creds.to_json())
            except FileExistsError:
                pass  # a concurrent start wrote it first: use theirs
        creds = load_credentials(path)
        if creds.role != role:
            raise CredentialsError(f"{path} is for role {creds.role!r}, expected {role!r}")
        out[user] = creds
    return out


def _quoted(items: Iterable[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def _permissions_block(p: Permissions) -> str:
    pub = f"publish: {{ allow: {_quoted(p.publish)}"
    pub += f", deny: {_quoted(p.deny_publish)} }}" if p.deny_publish else " }"
    sub = f"subscribe: {{ allow: {_quoted(p.subscribe)}"
    sub += f", deny: {_quoted(p.deny_subscribe)} }}" if p.deny_subscribe else " }"
    resp = ", allow_responses: true" if p.allow_responses else ""
    return f"{{ {pub}, {sub}{resp} }}"


def authorization_config(users: Iterable[Credentials]) -> str:
    """The ``authorization`` block of nats.conf for these users (contains the passwords: the
    config file must be mode 0600)."""
    lines = ["authorization {", "  users = ["]
    for c in users:
        perms = _permissions_block(permissions_for(c.role, c.user))
        lines.append(
            f"    {{ user: {json.dumps(c.user)}, password: {json.dumps(c.password)}, "
            f"permissions: {perms} }}"
        )
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def mesh_users(sidecars: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The users a mesh-managed NATS gets: one per role, plus one sidecar user per named
    sidecar (its own inbox subtree, so sidecars cannot read each other's replies)."""
    users = [("controlplane", "controlplane"), ("admin", "admin"), ("sidecar", "sidecar")]
    return users + [(f"sidecar-{subjects.token(name)}", "sidecar") for name in sidecars]


def child_env(creds: Credentials) -> dict[str, str]:
    """Environment that hands ``creds`` to a child process: the path only."""
    assert creds.path is not None, "generated credentials always have a file"
    return {CREDS_ENV: str(creds.path.resolve())}
