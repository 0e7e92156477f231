"""Who may do what on the bus: roles, their NATS permissions, and credential files.

The mesh's NATS users are plain user/password users of nats-server's config file
(``authorization { users = [...] }``): well supported by every nats-server, no account
JWTs to operate, and nats-py needs no extra package. Each user has one *role*:

* ``controlplane``: the replicas. Everything they need: the ``mesh.>`` subjects, JetStream
  (KV buckets), and replies to requests they receive (``allow_responses``).
* ``sidecar``: publishes its telemetry, spans, access logs, config requests, ACKs and
  heartbeats and its CSR requests; receives config pushes, bundle announcements and ``mesh
  certs`` queries. A *scoped* sidecar user (``SidecarScope``; every sidecar ``mesh up``
  starts, ``mesh nats --write-auth --sidecar SERVICE[/INSTANCE]``) may do so only on the
  subjects that name its own service (and instance): it cannot report telemetry, register or
  unregister endpoints, or read config pushes, for another service. The broad ``sidecar``
  user, the same for every service, is for sidecars started by hand with no user of their own.
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

import dataclasses
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
    "SidecarScope",
    "authorization_config",
    "ensure_credentials",
    "load_credentials",
    "permissions_for",
    "sidecar_user",
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


@dataclass(frozen=True, slots=True)
class SidecarScope:
    """What one sidecar user may speak for: a service, and optionally one instance and one
    telemetry namespace (``ANY``: not pinned). Not a secret and not stored in the credential
    file: whoever writes the nats-server config (``mesh up``, ``mesh nats --write-auth``)
    states it for each user each time."""

    service: str
    instance: str = subjects.ANY
    namespace: str = subjects.ANY

    def __post_init__(self) -> None:
        subjects.sidecar_publish(self.namespace, self.service, self.instance)  # checks names

    def describe(self) -> str:
        inst = "" if self.instance == subjects.ANY else f" instance {self.instance}"
        ns = "" if self.namespace == subjects.ANY else f" namespace {self.namespace}"
        return f"service {self.service}{inst}{ns}"


def _sidecar_common(inbox: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What every sidecar user has, scoped or not: (publish, subscribe)."""
    publish = (
        subjects.CA_SIGN,  # a CSR names its identity; the CA checks it against a join token
        subjects.CERTS_STATUS_ALL,
        # The trust domain of `mesh sidecar --namespace`: asked of the CA leader. No
        # $JS.API right at all: JetStream answers on whatever reply subject the request
        # names, with its own rights, so even a read-only KV get let a sidecar write the
        # answer into any KV key ($KV.mesh_ca.ca, the sealed CA, included).
        subjects.CA_BUNDLE_GET,
    )
    subscribe = (subjects.CA_BUNDLE, subjects.CERTS_QUERY, inbox)
    return publish, subscribe


def permissions_for(role: str, user: str, scope: SidecarScope | None = None) -> Permissions:
    """The exact permissions of one user of ``role``; subjects come from bus/subjects.py.

    A ``sidecar`` user with a ``scope`` publishes and receives only what names its own
    service (and instance and namespace, when pinned); without one it is the broad sidecar
    role, for sidecars started by hand with no user of their own."""
    inbox = inbox_prefix(user) + ".>"
    mesh_all = f"{subjects.PREFIX}.>"
    if scope is not None and role != "sidecar":
        raise CredentialsError(f"user {user!r}: only sidecar users have a service scope")
    if role == "controlplane":
        return Permissions(
            publish=(mesh_all, *_JETSTREAM),
            subscribe=(mesh_all, inbox),
            allow_responses=True,
        )
    if role == "sidecar":
        publish, subscribe = _sidecar_common(inbox)
        if scope is not None:
            return Permissions(
                publish=(
                    *subjects.sidecar_publish(scope.namespace, scope.service, scope.instance),
                    *publish,
                ),
                subscribe=(subjects.config_push(scope.service), *subscribe),
            )
        return Permissions(
            publish=(
                subjects.CONFIG_FULL_ALL,
                subjects.CONFIG_ACK_ALL,
                subjects.CONFIG_HEARTBEAT_ALL,
                subjects.TELEMETRY_ALL,
                subjects.SPANS_ALL,
                subjects.ACCESSLOG_ALL,
                *publish,
            ),
            subscribe=(subjects.CONFIG_PUSH_ALL, *subscribe),
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
    # Set by ensure_credentials from what was asked for, never read from the file: the
    # permissions are the config writer's decision, not the credential holder's.
    scope: SidecarScope | None = None

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


# (user, role) or (user, role, scope): one NATS user to have credentials for.
UserSpec = tuple[str, str] | tuple[str, str, "SidecarScope | None"]


def ensure_credentials(state_dir: Path, users: Iterable[UserSpec]) -> dict[str, Credentials]:
    """Credentials of ``(user, role[, scope])`` under ``<state_dir>/nats-creds/<user>.json``:
    read if present, else generated (32 random bytes) and written mode 0600. Returns them by
    user name, carrying the scope asked for. The directory is 0700."""
    folder = state_dir / CREDS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    out: dict[str, Credentials] = {}
    for spec in users:
        user, role = spec[0], spec[1]
        scope = spec[2] if len(spec) > 2 else None
        subjects.token(user)
        permissions_for(role, user, scope)  # unknown role: fail here, not in nats-server
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
        out[user] = dataclasses.replace(creds, scope=scope)
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
        perms = _permissions_block(permissions_for(c.role, c.user, c.scope))
        lines.append(
            f"    {{ user: {json.dumps(c.user)}, password: {json.dumps(c.password)}, "
            f"permissions: {perms} }}"
        )
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def sidecar_user(scope: SidecarScope) -> str:
    """The user name of a scoped sidecar: per instance when it is pinned, else per service."""
    name = scope.service if scope.instance == subjects.ANY else scope.instance
    return f"sidecar-{subjects.token(name)}"


def mesh_users(sidecars: Iterable[SidecarScope] = ()) -> list[UserSpec]:
    """The users a mesh-managed NATS gets: one per role, plus one user per named sidecar
    (``sidecar_user``) that may speak only for its own service (and instance), with its own
    inbox subtree, so sidecars can neither read each other's replies nor pose as each other.
    The broad ``sidecar`` user stays for sidecars started by hand next to a local mesh."""
    users: list[UserSpec] = [
        ("controlplane", "controlplane"),
        ("admin", "admin"),
        ("sidecar", "sidecar"),
    ]
    seen: dict[str, SidecarScope] = {}
    for scope in sidecars:
        user = sidecar_user(scope)
        if user in seen:
            if seen[user] != scope:
                raise CredentialsError(
                    f"two sidecars would share NATS user {user!r} with different rights "
                    f"({seen[user].describe()}; {scope.describe()}): give each an instance name"
                )
            continue
        seen[user] = scope
        users.append((user, "sidecar", scope))
    return users


def child_env(creds: Credentials) -> dict[str, str]:
    """Environment that hands ``creds`` to a child process: the path only."""
    assert creds.path is not None, "generated credentials always have a file"
    return {CREDS_ENV: str(creds.path.resolve())}
