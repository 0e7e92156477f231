"""Wire messages: typed, versioned, msgpack-encoded. The one list of message types.

Every message travels as a msgpack map ``{"t": type, "v": version, "b": body}``.
A reader refuses a message whose type it does not know, whose version is newer
than it understands, or whose body does not match the declared field types;
unknown *fields* in a body are ignored so that a newer writer can add optional
fields without breaking older readers (docs/messages.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import msgpack

from mesh.errors import MeshError

# Default ceiling for one message. NATS' own default max_payload is 1 MiB; the
# bus refuses bigger messages before the server does, with a clearer error.
MAX_MESSAGE_BYTES = 1024 * 1024


class MessageError(MeshError):
    """A message could not be encoded or decoded. The text says why."""


class MessageTooLarge(MessageError):
    pass


class UndecodableMessage(MessageError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


M = TypeVar("M", bound=Message)

_REGISTRY: dict[str, type[Message]] = {}
# Per class: (field name, checker, required) tuples, built once.
_FIELDS: dict[type[Message], tuple[tuple[str, Callable[[Any], bool], bool], ...]] = {}


def message(cls: type[M]) -> type[M]:
    """Register a message class. Its TYPE must be unique."""
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise TypeError(f"message type {cls.TYPE!r} is empty or registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


def _checker(tp: Any) -> Callable[[Any], bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(p(v) for p in parts)
    if tp is type(None):
        return lambda v: v is None
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if tp is Any:
        return lambda v: True
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        check = _checker(item)
        return lambda v: isinstance(v, list) and all(check(x) for x in v)
    if origin is dict:
        kt, vt = typing.get_args(tp) or (Any, Any)
        ck, cv = _checker(kt), _checker(vt)
        return lambda v: isinstance(v, dict) and all(ck(k) and cv(x) for k, x in v.items())
    if isinstance(tp, type):
        return lambda v: isinstance(v, tp)
    raise TypeError(f"unsupported field type {tp!r}")


def _fields(cls: type[Message]) -> tuple[tuple[str, Callable[[Any], bool], bool], ...]:
    spec = _FIELDS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls)
        spec = tuple(
            (
                f.name,
                _checker(hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
        )
        _FIELDS[cls] = spec
    return spec


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    body = {name: getattr(msg, name) for name, _, _ in _fields(type(msg))}
    data: bytes = msgpack.packb({"t": msg.TYPE, "v": msg.VERSION, "b": body}, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageTooLarge(
            f"{msg.TYPE} message is {len(data)} bytes, over the limit of {max_bytes} bytes"
        )
    return data


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    if len(data) > max_bytes:
        raise MessageTooLarge(
            f"message of {len(data)} bytes is over the limit of {max_bytes} bytes"
        )
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise UndecodableMessage(f"not msgpack: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise UndecodableMessage("not a mesh message: expected a map with a string 't' (type)")
    cls = _REGISTRY.get(obj["t"])
    if cls is None:
        raise UndecodableMessage(f"unknown message type {obj['t']!r}")
    version = obj.get("v")
    if not isinstance(version, int) or version > cls.VERSION or version < 1:
        raise UndecodableMessage(
            f"{cls.TYPE} message has version {version!r}; this reader understands 1..{cls.VERSION}"
        )
    body = obj.get("b")
    if not isinstance(body, dict):
        raise UndecodableMessage(f"{cls.TYPE} message has no body map")
    kwargs: dict[str, Any] = {}
    for name, check, required in _fields(cls):
        if name in body:
            value = body[name]
            if not check(value):
                raise UndecodableMessage(
                    f"{cls.TYPE} message: field {name!r} has the wrong type ({type(value).__name__})"
                )
            kwargs[name] = value
        elif required:
            raise UndecodableMessage(f"{cls.TYPE} message: field {name!r} is missing")
    return cls(**kwargs)


def decode_as(data: bytes, cls: type[M], max_bytes: int = MAX_MESSAGE_BYTES) -> M:
    msg = decode(data, max_bytes)
    if not isinstance(msg, cls):
        raise UndecodableMessage(f"expected a {cls.TYPE} message, got {msg.TYPE}")
    return msg


# --- The message types -----------------------------------------------------


@message
@dataclasses.dataclass(frozen=True, slots=True)
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    sender: str = ""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    replica: str
    version: str
    uptime_s: float
    actors: list[str] = dataclasses.field(default_factory=list)


@message
@dataclasses.dataclass(frozen=True, slots=True)
class Lifecycle(Message):
    """An actor started, crashed or is being restarted."""

    TYPE: ClassVar[str] = "lifecycle"
    replica: str
    actor: str
    event: str  # "started" | "crashed" | "stopped"
    detail: str = ""
    restarts: int = 0


@message
@dataclasses.dataclass(frozen=True, slots=True)
class Blob(Message):
    """Opaque bytes with a label, for tests and tools that move raw payloads."""

    TYPE: ClassVar[str] = "blob"
    label: str
    data: bytes


# --- Identity: leases, CA, certificates (actors/lease.py, actors/ca.py, sidecar/identity.py) ---


@message
@dataclasses.dataclass(frozen=True, slots=True)
class LeaseRecord(Message):
    """The value of a lease key in KV (actors/lease.py)."""

    TYPE: ClassVar[str] = "lease"
    holder: str
    ttl: float


@message
@dataclasses.dataclass(frozen=True, slots=True)
class CsrRequest(Message):
    """Sidecar -> CA: sign this CSR. Credential: a join token (first certificate) or the
    current chain plus a renewal proof signed by the current key. Never a private key."""

    TYPE: ClassVar[str] = "csr-request"
    identity: str  # the SPIFFE ID asked for
    csr: bytes  # DER
    token: str = ""
    chain: list[bytes] = dataclasses.field(default_factory=list)  # current chain, DER
    proof: bytes = b""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class CsrReply(Message):
    """CA -> sidecar: the signed chain and the trust bundle, or a refusal (reason + message)."""

    TYPE: ClassVar[str] = "csr-reply"
    ok: bool
    chain: list[bytes] = dataclasses.field(default_factory=list)  # DER, leaf first
    bundle_pem: bytes = b""
    signing_ca: bytes = b""  # DER of the certificate that signs now
    reason: str = ""
    message: str = ""
    # issued_at of the signed BundleAnnounce of this bundle: announcements older than it are
    # replays and ignored by the agent.
    bundle_issued_at: float = 0.0


@message
@dataclasses.dataclass(frozen=True, slots=True)
class BundleAnnounce(Message):
    """The trust bundle (published by the CA leader and stored in KV).

    Version 2 is signed (mesh/pki_announce.py): an agent installs an announced bundle only if
    one of ``signatures`` verifies with the key of the matching ``signers`` certificate and
    that certificate chains (through ``intermediates``) to a root the agent already trusts,
    and only if ``issued_at`` is not older than the last bundle it accepted (no replays).
    At ``mesh ca rotate`` the overlap bundle is signed by both the old and the new root."""

    TYPE: ClassVar[str] = "bundle"
    VERSION: ClassVar[int] = 2
    trust_domain: str
    roots_pem: bytes
    signing_ca: bytes  # DER; leaves not issued by it are renewed soon (rotation)
    leader: str = ""
    issued_at: float = 0.0  # CA clock when this content was signed (signed; agents refuse older)
    intermediates: list[bytes] = dataclasses.field(default_factory=list)  # DER, signer -> root
    signers: list[bytes] = dataclasses.field(default_factory=list)  # DER certificates
    signatures: list[bytes] = dataclasses.field(default_factory=list)  # one per signer


@message
@dataclasses.dataclass(frozen=True, slots=True)
class CaCommand(Message):
    """CLI -> CA leader: "status", "rotate" (introduce a new root) or "retire"."""

    TYPE: ClassVar[str] = "ca-command"
    action: str
    force: bool = False


@message
@dataclasses.dataclass(frozen=True, slots=True)
class CaCommandReply(Message):
    TYPE: ClassVar[str] = "ca-command-reply"
    ok: bool
    message: str
    leader: str = ""
    trust_domain: str = ""
    roots: list[str] = dataclasses.field(default_factory=list)  # SHA-256 fingerprints
    signing_root: str = ""
    reason: str = ""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class BundleQuery(Message):
    """-> the CA leader: reply with the signed BundleAnnounce in force (how a sidecar learns
    the trust domain without any JetStream right)."""

    TYPE: ClassVar[str] = "bundle-query"


@message
@dataclasses.dataclass(frozen=True, slots=True)
class CertsQuery(Message):
    """`mesh certs` -> every identity agent: publish your IdentityStatus to ``reply_to``."""

    TYPE: ClassVar[str] = "certs-query"
    reply_to: str


@message
@dataclasses.dataclass(frozen=True, slots=True)
class IdentityStatus(Message):
    """One identity agent's current certificate (never the key)."""

    TYPE: ClassVar[str] = "identity-status"
    agent: str
    identity: str
    serial: str = ""
    not_after: float = 0.0  # unix seconds
    seconds_left: float = 0.0
    renewals: int = 0
    roots: list[str] = dataclasses.field(default_factory=list)
    last_error: str = ""


def registered() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


# --- Telemetry, traces and access logs (docs/telemetry.md) -----------------


@message
@dataclasses.dataclass(frozen=True, slots=True)
class TelemetryBatch(Message):
    """One sidecar's per-pair aggregates for one interval (body schema: mesh/telemetry.py)."""

    TYPE: ClassVar[str] = "telemetry.batch"
    schema: int
    ns: str
    svc: str
    inst: str
    epoch: str
    seq: int
    ts: float
    interval: float
    hist: dict[str, Any]
    pairs: list[Any]


@message
@dataclasses.dataclass(frozen=True, slots=True)
class GoldenSummary(Message):
    """Golden signals of one service pair, per window, from one aggregator replica."""

    TYPE: ClassVar[str] = "telemetry.golden"
    replica: str
    src: str
    dst: str
    ts: float
    windows: dict[str, Any]


@message
@dataclasses.dataclass(frozen=True, slots=True)
class GraphQuery(Message):
    """Ask for the service graph over a window: on mesh.graph.query one replica answers
    (request/reply); on mesh.graph.scatter every replica answers to `reply_to`."""

    TYPE: ClassVar[str] = "telemetry.graph-query"
    window: str = "10s"
    reply_to: str = ""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class GraphReply(Message):
    TYPE: ClassVar[str] = "telemetry.graph"
    replica: str
    ts: float
    window: str
    nodes: list[str]
    edges: list[Any]
    ingest: dict[str, Any] = dataclasses.field(default_factory=dict)
    covered_s: float = 0.0  # seconds this replica has been merging batches


@message
@dataclasses.dataclass(frozen=True, slots=True)
class SpanRecord(Message):
    """One finished span of one sidecar hop (ids in lowercase hex, times in unix ns)."""

    TYPE: ClassVar[str] = "trace.span"
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: bool = False


@message
@dataclasses.dataclass(frozen=True, slots=True)
class TraceQuery(Message):
    TYPE: ClassVar[str] = "trace.query"
    trace_id: str


@message
@dataclasses.dataclass(frozen=True, slots=True)
class TraceReply(Message):
    TYPE: ClassVar[str] = "trace.spans"
    trace_id: str
    spans: list[Any]


@message
@dataclasses.dataclass(frozen=True, slots=True)
class AccessLogEntry(Message):
    """One access-log line (the same fields as the JSON line, docs/telemetry.md)."""

    TYPE: ClassVar[str] = "accesslog"
    entry: dict[str, Any]


# --- config sync (docs/sync.md) ----------------------------------------------------------


@message
@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotRequest(Message):
    """A sidecar registers and asks for its full snapshot (request on mesh.config.full)."""

    TYPE: ClassVar[str] = "config.request"
    instance: str
    service: str
    label: str  # the instance's version, e.g. "v2"
    address: str = ""  # host:port of its inbound listener; "" for pure clients
    admin: str = ""  # host:port of its admin listener
    have: str = ""  # the version it runs now
    reason: str = ""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotPush(Message):
    """A full snapshot (full=True) or a delta from `base` to `version` (docs/sync.md)."""

    TYPE: ClassVar[str] = "config.push"
    service: str
    version: str
    base: str
    nonce: str
    full: bool
    body: dict[str, Any]
    instance: str = ""  # "": every sidecar of the service


@message
@dataclasses.dataclass(frozen=True, slots=True)
class ConfigAck(Message):
    """ACK (ok=True) or NACK with the reason, echoing the push's version and nonce."""

    TYPE: ClassVar[str] = "config.ack"
    instance: str
    service: str
    version: str
    nonce: str
    ok: bool
    reason: str = ""


@message
@dataclasses.dataclass(frozen=True, slots=True)
class ConfigHeartbeat(Message):
    """A sidecar is alive: registration plus what it runs (mesh.config.heartbeat)."""

    TYPE: ClassVar[str] = "config.heartbeat"
    instance: str
    service: str
    label: str
    address: str = ""
    admin: str = ""
    acked: str = ""
    nacked: str = ""
    reason: str = ""
    resyncs: int = 0
    interval: float = 1.0
    leaving: bool = False


@message
@dataclasses.dataclass(frozen=True, slots=True)
class ConfigStatusRequest(Message):
    """Rows `offset`..`offset + limit` of the status (sorted by service, instance)."""

    TYPE: ClassVar[str] = "config.status_request"
    service: str = ""  # "": every service
    offset: int = 0
    limit: int = 1000


@message
@dataclasses.dataclass(frozen=True, slots=True)
class ConfigStatus(Message):
    """A replica's view of every sidecar (reply on mesh.config.status)."""

    TYPE: ClassVar[str] = "config.status"
    replica: str
    revision: int  # the configuration revision the current snapshots were compiled from
    sidecars: list[dict[str, Any]]
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    total: int = 0  # rows matching the request, of which `sidecars` is one page
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # SYNCED/STALE/NACKED
