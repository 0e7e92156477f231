"""User-facing resources: parse, validate strictly, diff, encode. Pure (no I/O but reading files).

Five kinds, each a YAML document ``{kind, name, spec}`` (docs/resources.md):
``Service``, ``Route``, ``DestinationPolicy``, ``AuthorizationPolicy``, ``MeshConfig``.

Every error names the file, the resource and the field path, e.g.
``routes.yaml: Route/reviews: spec.rules[1].split.v3: subset 'v3' is not defined by
DestinationPolicy/reviews (has: v1, v2)``. A batch is checked as a whole, together with what is
already stored, before anything is written: an invalid batch changes nothing.

The validated spec of each resource is kept as a plain, normalised dict (what the user wrote,
defaults not filled in) so that the store, the diff and `mesh get` show the user's own words.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import ConfigError
from mesh.pki_errors import SpiffeIdError
from mesh.spiffe import validate_trust_domain

KINDS = ("Service", "Route", "DestinationPolicy", "AuthorizationPolicy", "MeshConfig")
# Short names accepted by the CLI (`mesh get route`), all lower case.
KIND_ALIASES = {
    "service": "Service",
    "services": "Service",
    "svc": "Service",
    "route": "Route",
    "routes": "Route",
    "destinationpolicy": "DestinationPolicy",
    "destinationpolicies": "DestinationPolicy",
    "dp": "DestinationPolicy",
    "authorizationpolicy": "AuthorizationPolicy",
    "authorizationpolicies": "AuthorizationPolicy",
    "authz": "AuthorizationPolicy",
    "meshconfig": "MeshConfig",
}
LB_POLICIES = ("round_robin", "least_request", "hash")
RETRY_CONDITIONS = ("connect-failure", "reset", "timeout")
MTLS_MODES = ("strict", "permissive", "disable")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def kind_of(text: str) -> str:
    """Resolve a kind as typed on the command line (`route`, `Route`, `dp`)."""
    kind = KIND_ALIASES.get(text.lower())
    if kind is None:
        raise ConfigError(f"unknown kind {text!r} (use one of {', '.join(KINDS)})")
    return kind


@dataclass(frozen=True)
class Resource:
    kind: str
    name: str
    spec: dict[str, Any]
    source: str = field(default="", compare=False)  # file it came from, for messages

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "spec": self.spec}


ResourceSet = dict[tuple[str, str], Resource]


# --- a small strict schema checker ---------------------------------------------------------


class _V:
    """A value and its field path; checkers raise ConfigError naming the path."""

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def child(self, key: str | int) -> _V:
        if isinstance(key, int):
            return _V(self.value[key], f"{self.path}[{key}]")
        return _V(self.value[key], f"{self.path}.{key}")


Check = Callable[[_V], Any]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    names = {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), type(value).__name__)


def _str(v: _V) -> str:
    if not isinstance(v.value, str):
        raise v.fail(f"expected a string, got {_kind(v.value)}")
    if not v.value:
        raise v.fail("must not be empty")
    return v.value


def _name(v: _V) -> str:
    s = _str(v)
    if not _NAME.match(s):
        raise v.fail(
            f"{s!r} is not a valid name (lower-case letters, digits and '-', at most 63 characters)"
        )
    return s


def _int(lo: int, hi: int) -> Check:
    def check(v: _V) -> int:
        if isinstance(v.value, bool) or not isinstance(v.value, int):
            raise v.fail(f"expected an integer, got {_kind(v.value)}")
        if not lo <= v.value <= hi:
            raise v.fail(f"{v.value} is out of range {lo}..{hi}")
        return v.value

    return check


def _num(lo: float, hi: float) -> Check:
    def check(v: _V) -> float:
        if isinstance(v.value, bool) or not isinstance(v.value, int | float):
            raise v.fail(f"expected a number, got {_kind(v.value)}")
        if not lo <= v.value <= hi:
            raise v.fail(f"{v.value} is out of range {lo}..{hi}")
        return v.value

    return check


# A stored set is re-validated when it is read, but a rule added later must not make an older
# stored set unreadable: the control plane would then compile from nothing. While a stored set
# is decoded (decode_set), trust_domain is only checked to be a string; an odd value is refused
# where it matters, by the CA (check_trust_domain) and by `mesh apply`.
_DECODING_STORED: ContextVar[bool] = ContextVar("decoding_stored", default=False)


def _trust_domain(v: _V) -> str:
    if _DECODING_STORED.get():
        return _str(v)
    try:
        return validate_trust_domain(_str(v))
    except SpiffeIdError as exc:
        raise v.fail(str(exc)) from None


def _bool(v: _V) -> bool:
    if not isinstance(v.value, bool):
        raise v.fail(f"expected true or false, got {_kind(v.value)}")
    return v.value


def _enum(*choices: str) -> Check:
    def check(v: _V) -> str:
        s = _str(v)
        if s not in choices:
            raise v.fail(f"{s!r} is not one of {', '.join(choices)}")
        return s

    return check


def _list(item: Check, *, min_len: int = 0) -> Check:
    def check(v: _V) -> list[Any]:
        if not isinstance(v.value, list):
            raise v.fail(f"expected a list, got {_kind(v.value)}")
        if len(v.value) < min_len:
            raise v.fail(f"needs at least {min_len} item(s)")
        return [item(v.child(i)) for i in range(len(v.value))]

    return check


def _map(value: Check, *, key: Check = _str) -> Check:
    def check(v: _V) -> dict[str, Any]:
        if not isinstance(v.value, Mapping):
            raise v.fail(f"expected a mapping, got {_kind(v.value)}")
        out: dict[str, Any] = {}
        for k in v.value:
            key(_V(k, f"{v.path}.{k}"))
            out[k] = value(v.child(k))
        return out

    return check


def _obj(fields: Mapping[str, Check], required: Iterable[str] = ()) -> Check:
    required = tuple(required)

    def check(v: _V) -> dict[str, Any]:
        if not isinstance(v.value, Mapping):
            raise v.fail(f"expected a mapping, got {_kind(v.value)}")
        # YAML 1.1 reads a bare `on:` key as the boolean true.
        value = {("on" if k is True else k): x for k, x in v.value.items()}
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            raise v.fail(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(fields)})")
        for r in required:
            if value.get(r) is None:
                raise v.fail(f"missing required field '{r}'")
        node = _V(value, v.path)
        return {k: fields[k](node.child(k)) for k in fields if value.get(k) is not None}

    return check


def _string_match(*, allow_present: bool) -> Check:
    kinds = ("exact", "prefix", "regex", *(("present",) if allow_present else ()))

    def check(v: _V) -> dict[str, Any]:
        out: dict[str, Any] = _obj({k: (_bool if k == "present" else _str) for k in kinds})(v)
        if len(out) != 1:
            raise v.fail(f"give exactly one of {', '.join(kinds)}")
        if out.get("present") is False:
            raise v.child("present").fail("only 'present: true' is supported")
        if "regex" in out:
            try:
                re.compile(out["regex"])
            except re.error as exc:
                raise v.child("regex").fail(f"invalid regular expression: {exc}") from None
        return out

    return check


def _methods(v: _V) -> list[str]:
    methods: list[str] = _list(_str, min_len=1)(v)
    return [m.upper() for m in methods]


_MATCH = _obj(
    {
        "path": _string_match(allow_present=False),
        "headers": _map(_string_match(allow_present=True)),
        "methods": _methods,
        "source": _name,
    }
)


def _retry_on(v: _V) -> list[Any]:
    def item(x: _V) -> Any:
        if isinstance(x.value, int) and not isinstance(x.value, bool):
            return _int(500, 599)(x)
        if x.value in RETRY_CONDITIONS:
            return x.value
        raise x.fail(
            f"unknown retry condition {x.value!r} (use one of "
            f"{', '.join(RETRY_CONDITIONS)} or a 5xx status code)"
        )

    result: list[Any] = _list(item)(v)
    return result


_RETRIES = _obj(
    {
        "attempts": _int(1, 10),
        "per_try_timeout": _num(0.001, 3600),
        "on": _retry_on,
        "backoff": _obj({"base": _num(0, 60), "max": _num(0, 600)}),
    }
)


def _fault(v: _V) -> dict[str, Any]:
    out: dict[str, Any] = _obj(
        {
            "abort": _obj(
                {"percent": _num(0, 100), "status": _int(200, 599)}, required=("percent", "status")
            ),
            "delay": _obj(
                {"percent": _num(0, 100), "seconds": _num(0, 3600)}, required=("percent", "seconds")
            ),
        }
    )(v)
    if not out:
        raise v.fail("a fault needs 'abort' or 'delay'")
    return out


def _split(v: _V) -> dict[str, int]:
    out: dict[str, int] = _map(_int(0, 1_000_000), key=_name)(v)
    if not out or sum(out.values()) == 0:
        raise v.fail("weights must add up to more than 0")
    return out


_RULE = _obj(
    {
        "name": _name,
        "match": _MATCH,
        "split": _split,
        "timeout": _num(0.001, 86400),
        "retries": _RETRIES,
        "fault": _fault,
        # Traffic shadowing: a copy of `percent`% of the requests to one instance of `subset`.
        "mirror": _obj({"subset": _name, "percent": _num(0, 100)}, required=("subset",)),
    }
)

SPECS: dict[str, Check] = {
    "Service": _obj(
        {
            "protocol": _enum("http", "tcp"),
            # http: informational; tcp: the local port of the callers' TCP listener
            "port": _int(1, 65535),
            # tcp only: seconds without a byte either way before both sides are closed
            "idle_timeout": _num(0.001, 7 * 86400),
            "hosts": _list(_str),
            "dependencies": _list(_name),
        }
    ),
    "Route": _obj(
        {"service": _name, "rules": _list(_RULE, min_len=1)}, required=("service", "rules")
    ),
    "DestinationPolicy": _obj(
        {
            "service": _name,
            "subsets": _map(_obj({"version": _str}, required=("version",)), key=_name),
            "lb": _enum(*LB_POLICIES),
            "hash_header": _str,
            "connect_timeout": _num(0.001, 600),
            "connection_limits": _obj(
                {
                    "max_connections": _int(1, 1 << 30),
                    "max_pending": _int(0, 1 << 30),
                    "max_requests": _int(1, 1 << 30),
                    "max_requests_per_connection": _int(0, 1 << 30),
                }
            ),
            "outlier": _obj(
                {
                    "consecutive_5xx": _int(1, 1 << 30),
                    "base_ejection_seconds": _num(0.001, 86400),
                    "max_ejection_seconds": _num(0.001, 86400),
                    "max_ejection_percent": _int(0, 100),
                }
            ),
            "retry_budget": _obj(
                {
                    "ratio": _num(0, 100),
                    "min_per_second": _num(0, 1e6),
                    "window_seconds": _num(0.1, 3600),
                }
            ),
            "mtls": _enum(*MTLS_MODES),
        },
        required=("service",),
    ),
    "AuthorizationPolicy": _obj(
        {
            "service": _name,
            "action": _enum("allow", "deny"),
            "rules": _list(
                _obj(
                    {
                        "source": _name,
                        # The caller's namespace; without it a `source` means the service
                        # account in the destination's own namespace (sidecar/authz.py).
                        "namespace": _name,
                        "path": _string_match(allow_present=False),
                        "methods": _methods,
                    }
                ),
                min_len=1,
            ),
        },
        required=("service", "action", "rules"),
    ),
    "MeshConfig": _obj(
        {
            # Must equal the running CA's trust domain (check_trust_domain): it is fixed by
            # the CA's root, which an apply cannot replace.
            "trust_domain": _trust_domain,
            # Leaf lifetime of new certificates and renewals; the CA follows it at once.
            "cert_ttl_hours": _num(0.1, 24 * 366),
            "defaults": _obj(
                {
                    "timeout": _num(0.001, 86400),
                    "connect_timeout": _num(0.001, 600),
                    "inbound_timeout": _num(0.001, 86400),
                    "retries": _RETRIES,
                    # deny: a service no AuthorizationPolicy allows anything is closed to
                    # every caller (Istio's mesh-wide allow-nothing policy).
                    "authorization": _enum("allow", "deny"),
                }
            ),
        }
    ),
}


# --- documents -----------------------------------------------------------------------------


def parse_resource(doc: Any, where: str) -> Resource:
    """One document `{kind, name, spec}` -> Resource. `where` prefixes every error."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with kind, name and spec, got {_kind(doc)}")
    kind = doc.get("kind")
    if kind not in SPECS:
        raise ConfigError(f"{where}: kind: {kind!r} is not one of {', '.join(KINDS)}")
    name_v = _V(doc.get("name"), "name")
    if doc.get("name") is None:
        raise ConfigError(f"{where}: {kind}: missing required field 'name'")
    try:
        name = _name(name_v)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {kind}: {exc}") from None
    ref = f"{where}: {kind}/{name}"
    unknown = sorted(str(k) for k in doc if k not in ("kind", "name", "spec"))
    if unknown:
        raise ConfigError(
            f"{ref}: unknown field(s) {', '.join(unknown)} (allowed: kind, name, spec)"
        )
    if kind == "MeshConfig" and name != "default":
        raise ConfigError(f"{ref}: name: a MeshConfig must be named 'default'")
    spec_value = doc.get("spec")
    if spec_value is None:
        spec_value = {}
    try:
        spec: dict[str, Any] = SPECS[kind](_V(spec_value, "spec"))
    except ConfigError as exc:
        raise ConfigError(f"{ref}: {exc}") from None
    return Resource(kind=kind, name=name, spec=spec, source=where)


def parse_text(text: str, source: str) -> list[Resource]:
    """All documents of one YAML (or JSON) text; empty documents are skipped."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    out: list[Resource] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = source if len(docs) == 1 else f"{source} (document {i + 1})"
        out.append(parse_resource(doc, where))
    return out


def load_paths(paths: Iterable[str | Path]) -> list[Resource]:
    """Read files, or every *.yaml/*.yml/*.json in a directory (sorted, not recursive)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
            if not found:
                raise ConfigError(f"{p}: no .yaml, .yml or .json files in this directory")
            files.extend(found)
        else:
            files.append(p)
    errors: list[str] = []
    resources: list[Resource] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            errors.append(f"{f}: cannot read: {exc.strerror}")
            continue
        except UnicodeDecodeError:
            errors.append(f"{f}: not UTF-8 text")
            continue
        try:
            resources.extend(parse_text(text, str(f)))
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    seen: dict[tuple[str, str], Resource] = {}
    for r in resources:
        if r.key in seen:
            raise ConfigError(f"{r.source}: {r.ref}: defined twice (also in {seen[r.key].source})")
        seen[r.key] = r
    return resources


# --- whole-set checks ----------------------------------------------------------------------


def subsets_of(resources: ResourceSet, service: str) -> dict[str, str] | None:
    """Subset name -> version label from the service's DestinationPolicy (None: no policy)."""
    dp = policy_for(resources, service)
    if dp is None:
        return None
    return {k: v["version"] for k, v in dp.spec.get("subsets", {}).items()}


def is_tcp(service: Resource) -> bool:
    """A `protocol: tcp` Service: opaque TCP, compiled into TCP listeners (mesh/compile.py)."""
    return bool(service.spec.get("protocol") == "tcp")


def policy_for(resources: ResourceSet, service: str) -> Resource | None:
    for r in resources.values():
        if r.kind == "DestinationPolicy" and r.spec["service"] == service:
            return r
    return None


def route_for(resources: ResourceSet, service: str) -> Resource | None:
    for r in sorted(resources.values(), key=lambda r: r.name):
        if r.kind == "Route" and r.spec["service"] == service:
            return r
    return None


def validate_set(resources: ResourceSet) -> None:
    """Cross-resource checks; raises one ConfigError listing every broken reference."""
    errors: list[str] = []
    services = {r.name for r in resources.values() if r.kind == "Service"}
    known = ", ".join(sorted(services)) or "none"

    def where(r: Resource) -> str:
        return f"{r.source}: {r.ref}" if r.source else r.ref

    def need_service(r: Resource, path: str, name: str) -> bool:
        if name not in services:
            errors.append(f"{where(r)}: {path}: Service {name!r} does not exist (have: {known})")
            return False
        return True

    tcp_services = {
        r.name for r in resources.values() if r.kind == "Service" and is_tcp(r)
    }
    tcp_ports: dict[int, str] = {}
    owners: dict[tuple[str, str], str] = {}
    hosts: dict[str, str] = {}
    for r in sorted(resources.values(), key=lambda r: r.key):
        spec = r.spec
        if r.kind == "Service":
            for i, h in enumerate([r.name, *spec.get("hosts", [])]):
                other = hosts.setdefault(h.lower(), r.name)
                if other != r.name:
                    errors.append(
                        f"{where(r)}: spec.hosts[{i - 1}]: host {h!r} is already "
                        f"served by Service/{other}"
                    )
            for i, dep in enumerate(spec.get("dependencies", [])):
                need_service(r, f"spec.dependencies[{i}]", dep)
            if is_tcp(r):
                if "port" not in spec:
                    errors.append(
                        f"{where(r)}: spec.port: required with protocol: tcp (the local port "
                        "of the callers' TCP listener)"
                    )
                elif (other := tcp_ports.setdefault(spec["port"], r.name)) != r.name:
                    errors.append(
                        f"{where(r)}: spec.port: {spec['port']} is already the port of "
                        f"tcp Service/{other}"
                    )
                if spec.get("hosts"):
                    errors.append(
                        f"{where(r)}: spec.hosts: a tcp Service has no Host header to match"
                    )
            elif "idle_timeout" in spec:
                errors.append(f"{where(r)}: spec.idle_timeout: only with protocol: tcp")
            continue
        if r.kind == "MeshConfig":
            continue
        if not need_service(r, "spec.service", spec["service"]):
            continue
        if r.kind in ("Route", "DestinationPolicy"):
            owner = owners.setdefault((r.kind, spec["service"]), r.name)
            if owner != r.name:
                errors.append(
                    f"{where(r)}: spec.service: Service {spec['service']!r} already "
                    f"has {r.kind}/{owner} (one per service)"
                )
        if r.kind == "DestinationPolicy":
            if spec.get("lb") == "hash" and "hash_header" not in spec:
                errors.append(f"{where(r)}: spec.hash_header: required with lb: hash")
        elif r.kind == "Route" and spec["service"] in tcp_services:
            errors.append(
                f"{where(r)}: spec.service: Service {spec['service']!r} is protocol: tcp; "
                "Routes match HTTP requests (a tcp Service's callers reach all its instances)"
            )
        elif r.kind == "Route":
            subsets = subsets_of(resources, spec["service"])
            for i, rule in enumerate(spec["rules"]):
                src = rule.get("match", {}).get("source")
                if src is not None:
                    need_service(r, f"spec.rules[{i}].match.source", src)
                for subset in rule.get("split", {}):
                    if subsets is None:
                        errors.append(
                            f"{where(r)}: spec.rules[{i}].split.{subset}: Service "
                            f"{spec['service']!r} has no DestinationPolicy defining subsets"
                        )
                    elif subset not in subsets:
                        errors.append(
                            f"{where(r)}: spec.rules[{i}].split.{subset}: subset {subset!r} is "
                            f"not defined by the DestinationPolicy of {spec['service']!r} "
                            f"(has: {', '.join(subsets) or 'none'})"
                        )
                mirror = rule.get("mirror")
                if mirror is not None:
                    subset = mirror["subset"]
                    if subsets is None:
                        errors.append(
                            f"{where(r)}: spec.rules[{i}].mirror.subset: Service "
                            f"{spec['service']!r} has no DestinationPolicy defining subsets"
                        )
                    elif subset not in subsets:
                        errors.append(
                            f"{where(r)}: spec.rules[{i}].mirror.subset: subset {subset!r} is "
                            f"not defined by the DestinationPolicy of {spec['service']!r} "
                            f"(has: {', '.join(subsets) or 'none'})"
                        )
        elif r.kind == "AuthorizationPolicy":
            for i, rule in enumerate(spec["rules"]):
                if "source" in rule:
                    need_service(r, f"spec.rules[{i}].source", rule["source"])
    if errors:
        raise ConfigError("\n".join(errors))


def check_trust_domain(
    resources: ResourceSet, ca_trust_domain: str, *, stored: ResourceSet | None = None
) -> None:
    """Refuse a MeshConfig whose ``trust_domain`` is not the running CA's.

    The trust domain is baked into the CA's root and every leaf, so it cannot follow an apply.
    With ``stored``, a value already stored passes unchanged: a MeshConfig written before any
    CA existed must not block unrelated changes (a canary rollback) later; the CA itself
    refuses it and says so in its log and in `mesh ca status`.
    """
    key = ("MeshConfig", "default")
    config = resources.get(key)
    wanted = config.spec.get("trust_domain") if config is not None else None
    if config is None or wanted is None or wanted == ca_trust_domain:
        return
    before = stored.get(key) if stored is not None else None
    if before is not None and before.spec.get("trust_domain") == wanted:
        return
    where = f"{config.source}: {config.ref}" if config.source else config.ref
    raise ConfigError(
        f"{where}: spec.trust_domain: {wanted!r} is not the trust domain of the running CA, "
        f"{ca_trust_domain!r}; changing a mesh's trust domain needs a new root, which "
        f"`mesh apply` does not make: set spec.trust_domain to {ca_trust_domain!r} or leave "
        "it out"
    )


def merged(current: ResourceSet, applied: Iterable[Resource]) -> ResourceSet:
    out = dict(current)
    for r in applied:
        out[r.key] = r
    return out


def diff(old: ResourceSet, new: ResourceSet) -> list[str]:
    """Human-readable changes: `+ Kind/name`, `- Kind/name`, `~ Kind/name: path: a -> b`."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a is None and b is not None:
            lines.append(f"+ {b.ref}")
        elif b is None and a is not None:
            lines.append(f"- {a.ref}")
        elif a is not None and b is not None and a.spec != b.spec:
            lines.append(f"~ {b.ref}")
            lines.extend(f"    {p}: {x} -> {y}" for p, x, y in _changes(a.spec, b.spec, "spec"))
    return lines


def _changes(a: Any, b: Any, path: str) -> Iterable[tuple[str, str, str]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            yield from _changes(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _changes(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, _short(a), _short(b)


def _short(v: Any) -> str:
    text = "(none)" if v is None else json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# --- storage encoding ----------------------------------------------------------------------


def encode_set(resources: ResourceSet, note: str = "") -> bytes:
    """Canonical JSON of a whole set: what one KV revision holds."""
    items = [r.to_dict() for r in sorted(resources.values(), key=lambda r: r.key)]
    return json.dumps(
        {"note": note, "resources": items}, sort_keys=True, separators=(",", ":")
    ).encode()


def decode_set(data: bytes) -> tuple[ResourceSet, str]:
    """Inverse of encode_set; re-validates everything (a stored set is trusted no further)."""
    if not data:
        return {}, ""
    try:
        obj = json.loads(data)
        items = obj["resources"]
        note = str(obj.get("note", ""))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ConfigError(f"stored configuration is unreadable: {exc}") from None
    if not isinstance(items, list):
        raise ConfigError("stored configuration is unreadable: 'resources' is not a list")
    out: ResourceSet = {}
    token = _DECODING_STORED.set(True)
    try:
        for i, doc in enumerate(items):
            r = parse_resource(doc, f"stored[{i}]")
            out[r.key] = Resource(r.kind, r.name, r.spec)
        validate_set(out)
    except (TypeError, AttributeError, RecursionError) as exc:  # written bypassing `mesh apply`
        raise ConfigError(f"stored configuration is unreadable: {exc!r}") from None
    finally:
        _DECODING_STORED.reset(token)
    return out, note


def to_yaml(resources: Iterable[Resource]) -> str:
    return yaml.safe_dump_all([r.to_dict() for r in resources], sort_keys=False)
