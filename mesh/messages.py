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


def registered() -> dict[str, type[Message]]:
    return dict(_REGISTRY)
