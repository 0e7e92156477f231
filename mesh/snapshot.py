"""The proxy snapshot: the compiled, per-sidecar configuration.

One immutable value holds everything a sidecar needs to proxy: limits, the inbound
policy, the outbound services with their routes, the clusters with their subsets and
endpoints, and the opaque TCP listeners. Today it is read from a YAML/JSON file; later
the control plane compiles the same type, which is why it is plain data with
`from_dict`/`to_dict` and no behaviour beyond validation.

Every error names the field path (``services[0].routes[1].split.v3``) so that a user
can find the mistake; `load_snapshot` adds the file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import ConfigError
from mesh.pki_errors import SpiffeIdError
from mesh.spiffe import parse_spiffe_id

LB_POLICIES = ("round_robin", "least_request", "hash")
MTLS_MODES = ("STRICT", "PERMISSIVE", "DISABLE")
AUTHZ_ACTIONS = ("allow", "deny")
RETRY_CONDITIONS = ("connect-failure", "reset", "timeout")


@dataclass(frozen=True)
class StringMatch:
    """Exactly one of exact/prefix/regex is set; `present` only asks that the header exists."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    present: bool = False


@dataclass(frozen=True)
class Match:
    path: StringMatch | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, StringMatch], ...] = ()
    source: str | None = None


@dataclass(frozen=True)
class Abort:
    percent: float
    status: int


@dataclass(frozen=True)
class Delay:
    percent: float
    seconds: float


@dataclass(frozen=True)
class Fault:
    abort: Abort | None = None
    delay: Delay | None = None


@dataclass(frozen=True)
class Backoff:
    base: float = 0.025
    max: float = 0.25


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 1
    per_try_timeout: float | None = None
    on: tuple[str, ...] = ("connect-failure", "reset")
    statuses: tuple[int, ...] = ()
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True)
class Mirror:
    """Traffic shadowing: a copy of `percent`% of the route's requests goes to one endpoint
    of `cluster`/`subset`, fire-and-forget (its response is discarded)."""

    cluster: str
    subset: str
    percent: float = 100.0


@dataclass(frozen=True)
class Route:
    name: str
    match: Match
    cluster: str
    split: tuple[tuple[str, int], ...]
    timeout: float = 15.0
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    fault: Fault | None = None
    mirror: Mirror | None = None


@dataclass(frozen=True)
class Service:
    name: str
    hosts: tuple[str, ...]
    routes: tuple[Route, ...]


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending: int = 1024
    max_requests: int = 1024
    max_requests_per_connection: int = 0  # 0: unlimited


@dataclass(frozen=True)
class Outlier:
    consecutive_5xx: int = 5
    base_ejection_seconds: float = 30.0
    max_ejection_seconds: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RetryBudget:
    ratio: float = 0.2
    min_per_second: float = 10.0
    window_seconds: float = 10.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Cluster:
    name: str
    subsets: tuple[tuple[str, tuple[Endpoint, ...]], ...]
    lb: str = "round_robin"
    hash_header: str | None = None
    connect_timeout: float = 1.0
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier: Outlier = field(default_factory=Outlier)
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    # mTLS (when the sidecar has an identity): the SPIFFE ID the endpoints must present
    # (None: spiffe://<own trust domain>/ns/<own namespace>/sa/<cluster name>), and whether
    # to use mTLS at all (False for endpoints that are plain apps, not sidecars).
    identity: str | None = None
    mtls: bool = True

    def subset(self, name: str) -> tuple[Endpoint, ...] | None:
        for subset_name, endpoints in self.subsets:
            if subset_name == name:
                return endpoints
        return None


@dataclass(frozen=True)
class InboundFault:
    match: Match
    fault: Fault


@dataclass(frozen=True)
class AuthzRule:
    """Holds if every given field matches. Identity fields need a verified (mTLS) caller."""

    action: str  # allow | deny
    identity: str | None = None  # the caller's full SPIFFE ID
    namespace: str | None = None  # the caller's namespace
    source: str | None = None  # the caller's service account
    path: StringMatch | None = None
    methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Authz:
    """Istio's order: a matching deny rule denies; else, if any allow rule exists, the request
    must match one; else `default` decides."""

    default: str = "allow"  # allow | deny (default-deny)
    rules: tuple[AuthzRule, ...] = ()


DEFAULT_TCP_IDLE_TIMEOUT = 3600.0  # seconds, as Envoy's tcp_proxy


@dataclass(frozen=True)
class InboundTcp:
    """Present when this sidecar's service is opaque TCP: the inbound listener (after mTLS
    and authorization by caller identity) splices each connection to the app port."""

    idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT


@dataclass(frozen=True)
class Inbound:
    timeout: float = 15.0
    faults: tuple[InboundFault, ...] = ()
    mtls: str | None = None  # STRICT | PERMISSIVE | DISABLE; None: the sidecar's --mtls
    authz: Authz | None = None
    tcp: InboundTcp | None = None


@dataclass(frozen=True)
class TcpProxy:
    """A local opaque TCP listener on 127.0.0.1:`port` (0: any free port), each connection
    spliced to one endpoint of `cluster`/`subset` (mTLS when the sidecar has an identity and
    the cluster's `mtls` is on) and closed after `idle_timeout` seconds without a byte."""

    name: str
    port: int
    cluster: str
    subset: str
    idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 16384
    max_body_bytes: int | None = None  # None: unlimited, bodies are streamed
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    stream_timeout: float = 300.0
    # HTTP upgrade tunnels (101): closed after this long without a byte either way.
    tunnel_idle_timeout: float = 3600.0


@dataclass(frozen=True)
class Snapshot:
    version: str
    service: str | None = None
    limits: Limits = field(default_factory=Limits)
    inbound: Inbound = field(default_factory=Inbound)
    services: tuple[Service, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    tcp: tuple[TcpProxy, ...] = ()

    @staticmethod
    def from_dict(data: Any) -> Snapshot:
        """Parse and check a plain dict; raises ConfigError naming the field path."""
        return _parse_snapshot(_Node(data, ""))

    def to_dict(self) -> dict[str, Any]:
        return _snapshot_to_dict(self)

    def cluster(self, name: str) -> Cluster | None:
        for c in self.clusters:
            if c.name == name:
                return c
        return None


def load_snapshot(path: str | Path) -> Snapshot:
    """Read a YAML or JSON file (JSON is YAML) into a checked Snapshot."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read snapshot: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: snapshot is not UTF-8 text") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    try:
        return Snapshot.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


# --- parsing ---------------------------------------------------------------------------


class _Node:
    """A value plus its field path, with typed getters that raise ConfigError."""

    def __init__(self, value: Any, path: str) -> None:
        self.value = value
        self.path = path

    def fail(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path or '<top>'}: {message}")

    def mapping(self) -> Mapping[str, Any]:
        if not isinstance(self.value, Mapping):
            raise self.fail(f"expected a mapping, got {_kind(self.value)}")
        if any(k is True for k in self.value):
            # YAML 1.1 reads a bare `on:` key as the boolean true.
            self.value = {("on" if k is True else k): v for k, v in self.value.items()}
        return self.value

    def check_keys(self, allowed: tuple[str, ...]) -> None:
        extra = sorted(str(k) for k in self.mapping() if k not in allowed)
        if extra:
            raise self.fail(f"unknown field(s) {', '.join(extra)} (allowed: {', '.join(allowed)})")

    def get(self, key: str) -> _Node | None:
        m = self.mapping()
        if key not in m or m[key] is None:
            return None
        return _Node(m[key], f"{self.path}.{key}" if self.path else key)

    def req(self, key: str) -> _Node:
        node = self.get(key)
        if node is None:
            raise self.fail(f"missing required field '{key}'")
        return node

    def items(self) -> list[_Node]:
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {_kind(self.value)}")
        return [_Node(v, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def str_(self) -> str:
        if isinstance(self.value, bool) or not isinstance(self.value, str | int | float):
            raise self.fail(f"expected a string, got {_kind(self.value)}")
        s = str(self.value)
        if not s:
            raise self.fail("must not be empty")
        return s

    def int_(self, lo: int, hi: int) -> int:
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self.fail(f"expected an integer, got {_kind(self.value)}")
        if not lo <= self.value <= hi:
            raise self.fail(f"{self.value} is out of range {lo}..{hi}")
        return self.value

    def num(self, lo: float, hi: float) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise self.fail(f"expected a number, got {_kind(self.value)}")
        v = float(self.value)
        if not lo <= v <= hi:
            raise self.fail(f"{v} is out of range {lo}..{hi}")
        return v

    def bool_(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.fail(f"expected true or false, got {_kind(self.value)}")
        return self.value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _opt_str(node: _Node, key: str) -> str | None:
    child = node.get(key)
    return None if child is None else child.str_()


def _opt_num(node: _Node, key: str, default: float, lo: float = 0.0, hi: float = 1e9) -> float:
    child = node.get(key)
    return default if child is None else child.num(lo, hi)


def _opt_int(node: _Node, key: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
    child = node.get(key)
    return default if child is None else child.int_(lo, hi)


def _parse_string_match(node: _Node, allow_present: bool) -> StringMatch:
    if isinstance(node.value, str):  # shorthand: a bare string is an exact match
        return StringMatch(exact=node.value)
    keys = ("exact", "prefix", "regex", *(("present",) if allow_present else ()))
    node.check_keys(keys)
    given = [k for k in keys if node.get(k) is not None]
    if len(given) != 1:
        raise node.fail(f"give exactly one of {', '.join(keys)}")
    kind = given[0]
    child = node.req(kind)
    if kind == "present":
        if not child.bool_():
            raise child.fail("only 'present: true' is supported")
        return StringMatch(present=True)
    text = child.value if isinstance(child.value, str) else child.str_()
    if kind == "regex":
        try:
            re.compile(text)
        except re.error as exc:
            raise child.fail(f"invalid regular expression: {exc}") from None
        return StringMatch(regex=text)
    if kind == "prefix":
        return StringMatch(prefix=text)
    return StringMatch(exact=text)


def _parse_match(node: _Node | None) -> Match:
    if node is None:
        return Match()
    node.check_keys(("path", "methods", "headers", "source"))
    path_node = node.get("path")
    path = _parse_string_match(path_node, allow_present=False) if path_node else None
    methods: tuple[str, ...] = ()
    methods_node = node.get("methods")
    if methods_node is not None:
        methods = tuple(m.str_().upper() for m in methods_node.items())
    headers: list[tuple[str, StringMatch]] = []
    headers_node = node.get("headers")
    if headers_node is not None:
        for name in headers_node.mapping():
            headers.append((str(name).lower(),
                            _parse_string_match(headers_node.req(str(name)), allow_present=True)))
    return Match(path=path, methods=methods, headers=tuple(headers), source=_opt_str(node, "source"))


def _parse_fault(node: _Node | None) -> Fault | None:
    if node is None:
        return None
    node.check_keys(("abort", "delay"))
    abort = delay = None
    a = node.get("abort")
    if a is not None:
        a.check_keys(("percent", "status"))
        abort = Abort(percent=a.req("percent").num(0, 100), status=a.req("status").int_(200, 599))
    d = node.get("delay")
    if d is not None:
        d.check_keys(("percent", "seconds"))
        delay = Delay(percent=d.req("percent").num(0, 100), seconds=d.req("seconds").num(0, 3600))
    if abort is None and delay is None:
        raise node.fail("a fault needs 'abort' or 'delay'")
    return Fault(abort=abort, delay=delay)


def _parse_retries(node: _Node | None) -> RetryPolicy:
    if node is None:
        return RetryPolicy()
    node.check_keys(("attempts", "per_try_timeout", "on", "backoff"))
    conditions: list[str] = []
    statuses: list[int] = []
    on_node = node.get("on")
    if on_node is not None:
        for item in on_node.items():
            if isinstance(item.value, int) and not isinstance(item.value, bool):
                statuses.append(item.int_(500, 599))
            elif item.value in RETRY_CONDITIONS:
                conditions.append(item.value)
            else:
                raise item.fail(f"unknown retry condition {item.value!r} (use one of "
                                f"{', '.join(RETRY_CONDITIONS)} or a 5xx status code)")
    else:
        conditions = list(RetryPolicy.on)
    backoff = Backoff()
    b = node.get("backoff")
    if b is not None:
        b.check_keys(("base", "max"))
        backoff = Backoff(base=_opt_num(b, "base", backoff.base, 0, 60),
                          max=_opt_num(b, "max", backoff.max, 0, 600))
    per_try = node.get("per_try_timeout")
    return RetryPolicy(
        attempts=_opt_int(node, "attempts", 1, 1, 10),
        per_try_timeout=None if per_try is None else per_try.num(0.001, 3600),
        on=tuple(conditions), statuses=tuple(statuses), backoff=backoff)


def _parse_route(node: _Node, service: str) -> Route:
    node.check_keys(("name", "match", "cluster", "split", "timeout", "retries", "fault",
                     "mirror"))
    cluster = _opt_str(node, "cluster") or service
    split_node = node.get("split")
    split: list[tuple[str, int]] = []
    if split_node is not None:
        for subset in split_node.mapping():
            split.append((str(subset), split_node.req(str(subset)).int_(0, 1_000_000)))
        if not split or sum(w for _, w in split) == 0:
            raise split_node.fail("weights must add up to more than 0")
    return Route(
        name=_opt_str(node, "name") or node.path,
        match=_parse_match(node.get("match")),
        cluster=cluster,
        split=tuple(split),
        timeout=_opt_num(node, "timeout", 15.0, 0.001, 86400),
        retries=_parse_retries(node.get("retries")),
        fault=_parse_fault(node.get("fault")),
        mirror=_parse_mirror(node.get("mirror"), cluster),
    )


def _parse_mirror(node: _Node | None, cluster: str) -> Mirror | None:
    if node is None:
        return None
    node.check_keys(("cluster", "subset", "percent"))
    return Mirror(cluster=_opt_str(node, "cluster") or cluster,
                  subset=node.req("subset").str_(),
                  percent=_opt_num(node, "percent", 100.0, 0, 100))


def _parse_endpoint(node: _Node) -> Endpoint:
    text = node.str_()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise node.fail(f"endpoint {text!r} is not host:port")
    return Endpoint(host=host, port=int(port))


def _parse_cluster(node: _Node) -> Cluster:
    node.check_keys(("name", "lb", "hash_header", "connect_timeout", "subsets",
                     "circuit_breaker", "outlier", "retry_budget", "identity", "mtls"))
    name = node.req("name").str_()
    lb_node = node.get("lb")
    lb = "round_robin" if lb_node is None else lb_node.str_()
    if lb not in LB_POLICIES:
        raise node.req("lb").fail(f"unknown policy {lb!r} (use one of {', '.join(LB_POLICIES)})")
    hash_header = _opt_str(node, "hash_header")
    if lb == "hash" and hash_header is None:
        raise node.fail("lb 'hash' needs 'hash_header'")
    subsets_node = node.req("subsets")
    subsets: list[tuple[str, tuple[Endpoint, ...]]] = []
    for subset in subsets_node.mapping():
        eps = tuple(_parse_endpoint(e) for e in subsets_node.req(str(subset)).items())
        subsets.append((str(subset), eps))
    cb = CircuitBreaker()
    cb_node = node.get("circuit_breaker")
    if cb_node is not None:
        cb_node.check_keys(("max_connections", "max_pending", "max_requests",
                            "max_requests_per_connection"))
        cb = CircuitBreaker(
            max_connections=_opt_int(cb_node, "max_connections", cb.max_connections, 1),
            max_pending=_opt_int(cb_node, "max_pending", cb.max_pending, 0),
            max_requests=_opt_int(cb_node, "max_requests", cb.max_requests, 1),
            max_requests_per_connection=_opt_int(cb_node, "max_requests_per_connection", 0, 0))
    od = Outlier()
    od_node = node.get("outlier")
    if od_node is not None:
        od_node.check_keys(("consecutive_5xx", "base_ejection_seconds", "max_ejection_seconds",
                            "max_ejection_percent"))
        od = Outlier(
            consecutive_5xx=_opt_int(od_node, "consecutive_5xx", od.consecutive_5xx, 1),
            base_ejection_seconds=_opt_num(od_node, "base_ejection_seconds",
                                           od.base_ejection_seconds, 0.001, 86400),
            max_ejection_seconds=_opt_num(od_node, "max_ejection_seconds",
                                          od.max_ejection_seconds, 0.001, 86400),
            max_ejection_percent=_opt_int(od_node, "max_ejection_percent",
                                          od.max_ejection_percent, 0, 100))
    rb = RetryBudget()
    rb_node = node.get("retry_budget")
    if rb_node is not None:
        rb_node.check_keys(("ratio", "min_per_second", "window_seconds"))
        rb = RetryBudget(
            ratio=_opt_num(rb_node, "ratio", rb.ratio, 0, 100),
            min_per_second=_opt_num(rb_node, "min_per_second", rb.min_per_second, 0, 1e6),
            window_seconds=_opt_num(rb_node, "window_seconds", rb.window_seconds, 0.1, 3600))
    return Cluster(name=name, subsets=tuple(subsets), lb=lb, hash_header=hash_header,
                   connect_timeout=_opt_num(node, "connect_timeout", 1.0, 0.001, 600),
                   circuit_breaker=cb, outlier=od, retry_budget=rb,
                   identity=_opt_spiffe(node, "identity"),
                   mtls=True if node.get("mtls") is None else node.req("mtls").bool_())


def _opt_spiffe(node: _Node, key: str) -> str | None:
    child = node.get(key)
    if child is None:
        return None
    try:
        return parse_spiffe_id(child.str_()).uri
    except SpiffeIdError as exc:
        raise child.fail(str(exc)) from None


def _parse_mtls(node: _Node) -> str:
    mode = node.str_().upper()
    if mode not in MTLS_MODES:
        raise node.fail(f"unknown mTLS mode {node.value!r} (use one of {', '.join(MTLS_MODES)})")
    return mode


def _parse_authz(node: _Node) -> Authz:
    node.check_keys(("default", "rules"))
    default = "allow"
    default_node = node.get("default")
    if default_node is not None:
        default = default_node.str_()
        if default not in AUTHZ_ACTIONS:
            raise default_node.fail(f"expected allow or deny, got {default!r}")
    rules: list[AuthzRule] = []
    rules_node = node.get("rules")
    for r in rules_node.items() if rules_node else []:
        r.check_keys(("action", "identity", "namespace", "source", "path", "methods"))
        action = r.req("action").str_()
        if action not in AUTHZ_ACTIONS:
            raise r.req("action").fail(f"expected allow or deny, got {action!r}")
        path_node = r.get("path")
        methods_node = r.get("methods")
        rules.append(AuthzRule(
            action=action, identity=_opt_spiffe(r, "identity"),
            namespace=_opt_str(r, "namespace"), source=_opt_str(r, "source"),
            path=_parse_string_match(path_node, allow_present=False) if path_node else None,
            methods=tuple(m.str_().upper() for m in methods_node.items()) if methods_node
            else ()))
    return Authz(default=default, rules=tuple(rules))


def _parse_snapshot(root: _Node) -> Snapshot:
    root.check_keys(("version", "service", "limits", "inbound", "services", "clusters", "tcp"))
    limits = Limits()
    lim = root.get("limits")
    if lim is not None:
        lim.check_keys(("max_header_bytes", "max_body_bytes", "header_timeout", "idle_timeout",
                        "stream_timeout", "tunnel_idle_timeout"))
        body = lim.get("max_body_bytes")
        limits = Limits(
            max_header_bytes=_opt_int(lim, "max_header_bytes", limits.max_header_bytes, 256,
                                      1 << 20),
            max_body_bytes=None if body is None else body.int_(0, 1 << 62),
            header_timeout=_opt_num(lim, "header_timeout", limits.header_timeout, 0.001, 3600),
            idle_timeout=_opt_num(lim, "idle_timeout", limits.idle_timeout, 0.001, 86400),
            stream_timeout=_opt_num(lim, "stream_timeout", limits.stream_timeout, 0.001, 86400),
            tunnel_idle_timeout=_opt_num(lim, "tunnel_idle_timeout", limits.tunnel_idle_timeout,
                                         0.001, 7 * 86400))
    inbound = Inbound()
    inb = root.get("inbound")
    if inb is not None:
        inb.check_keys(("timeout", "faults", "mtls", "authz", "tcp"))
        faults: list[InboundFault] = []
        faults_node = inb.get("faults")
        for f in faults_node.items() if faults_node else []:
            f.check_keys(("match", "abort", "delay"))
            fault = _parse_fault(_Node({k: v for k, v in f.mapping().items() if k != "match"},
                                       f.path))
            assert fault is not None
            faults.append(InboundFault(match=_parse_match(f.get("match")), fault=fault))
        mtls_node = inb.get("mtls")
        authz_node = inb.get("authz")
        tcp_in_node = inb.get("tcp")
        tcp_in: InboundTcp | None = None
        if tcp_in_node is not None:
            tcp_in_node.check_keys(("idle_timeout",))
            tcp_in = InboundTcp(idle_timeout=_opt_num(tcp_in_node, "idle_timeout",
                                                      DEFAULT_TCP_IDLE_TIMEOUT, 0.001, 7 * 86400))
        inbound = Inbound(timeout=_opt_num(inb, "timeout", 15.0, 0.001, 86400),
                          faults=tuple(faults),
                          mtls=_parse_mtls(mtls_node) if mtls_node else None,
                          authz=_parse_authz(authz_node) if authz_node else None,
                          tcp=tcp_in)
    clusters_node = root.get("clusters")
    clusters = [_parse_cluster(c) for c in (clusters_node.items() if clusters_node else [])]
    by_name: dict[str, Cluster] = {}
    for i, c in enumerate(clusters):
        if c.name in by_name:
            raise ConfigError(f"clusters[{i}].name: duplicate cluster {c.name!r}")
        by_name[c.name] = c
    services_node = root.get("services")
    services: list[Service] = []
    seen_hosts: dict[str, str] = {}
    for s in services_node.items() if services_node else []:
        s.check_keys(("name", "hosts", "routes"))
        name = s.req("name").str_()
        hosts_node = s.get("hosts")
        hosts = tuple(h.str_().lower() for h in hosts_node.items()) if hosts_node else (name,)
        for h in hosts:
            if h in seen_hosts:
                raise s.fail(f"host {h!r} is already served by service {seen_hosts[h]!r}")
            seen_hosts[h] = name
        routes = tuple(_parse_route(r, name) for r in s.req("routes").items())
        for j, r in enumerate(routes):
            _check_route(r, by_name, f"{s.path}.routes[{j}]")
        services.append(Service(name=name, hosts=hosts, routes=routes))
    tcp: list[TcpProxy] = []
    tcp_node = root.get("tcp")
    for t in tcp_node.items() if tcp_node else []:
        t.check_keys(("name", "port", "cluster", "subset", "idle_timeout"))
        proxy = TcpProxy(name=t.req("name").str_(), port=t.req("port").int_(0, 65535),
                         cluster=t.req("cluster").str_(), subset=t.req("subset").str_(),
                         idle_timeout=_opt_num(t, "idle_timeout", DEFAULT_TCP_IDLE_TIMEOUT,
                                               0.001, 7 * 86400))
        if any(p.name == proxy.name for p in tcp):
            raise t.fail(f"duplicate tcp listener {proxy.name!r}")
        if proxy.port and any(p.port == proxy.port for p in tcp):
            raise t.fail(f"port {proxy.port} is already used by another tcp listener")
        tc = by_name.get(proxy.cluster)
        if tc is None:
            raise t.fail(f"cluster {proxy.cluster!r} does not exist")
        if tc.subset(proxy.subset) is None:
            raise t.fail(f"subset {proxy.subset!r} not in cluster {tc.name!r}")
        tcp.append(proxy)
    return Snapshot(version=root.req("version").str_(), service=_opt_str(root, "service"),
                    limits=limits, inbound=inbound, services=tuple(services),
                    clusters=tuple(clusters), tcp=tuple(tcp))


def _check_route(route: Route, clusters: Mapping[str, Cluster], path: str) -> None:
    cluster = clusters.get(route.cluster)
    if cluster is None:
        raise ConfigError(f"{path}.cluster: cluster {route.cluster!r} does not exist "
                          f"(have: {', '.join(sorted(clusters)) or 'none'})")
    if not route.split and len(cluster.subsets) != 1:
        raise ConfigError(f"{path}.split: required because cluster {cluster.name!r} has "
                          f"{len(cluster.subsets)} subsets")
    for subset, _ in route.split:
        if cluster.subset(subset) is None:
            names = ", ".join(n for n, _ in cluster.subsets)
            raise ConfigError(f"{path}.split.{subset}: subset {subset!r} not in cluster "
                              f"{cluster.name!r} (has: {names})")
    mirror = route.mirror
    if mirror is not None:
        target = clusters.get(mirror.cluster)
        if target is None:
            raise ConfigError(f"{path}.mirror.cluster: cluster {mirror.cluster!r} does not "
                              f"exist (have: {', '.join(sorted(clusters)) or 'none'})")
        if target.subset(mirror.subset) is None:
            names = ", ".join(n for n, _ in target.subsets)
            raise ConfigError(f"{path}.mirror.subset: subset {mirror.subset!r} not in cluster "
                              f"{target.name!r} (has: {names})")


# --- serialising -----------------------------------------------------------------------


def _string_match_to_dict(m: StringMatch) -> dict[str, Any]:
    if m.present:
        return {"present": True}
    for key in ("exact", "prefix", "regex"):
        value = getattr(m, key)
        if value is not None:
            return {key: value}
    return {}


def _match_to_dict(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if m.path is not None:
        out["path"] = _string_match_to_dict(m.path)
    if m.methods:
        out["methods"] = list(m.methods)
    if m.headers:
        out["headers"] = {k: _string_match_to_dict(v) for k, v in m.headers}
    if m.source is not None:
        out["source"] = m.source
    return out


def _fault_to_dict(f: Fault) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.abort is not None:
        out["abort"] = {"percent": f.abort.percent, "status": f.abort.status}
    if f.delay is not None:
        out["delay"] = {"percent": f.delay.percent, "seconds": f.delay.seconds}
    return out


def _route_to_dict(r: Route) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": r.name, "match": _match_to_dict(r.match), "cluster": r.cluster,
        "timeout": r.timeout,
        "retries": {"attempts": r.retries.attempts, "per_try_timeout": r.retries.per_try_timeout,
                    "on": [*r.retries.on, *r.retries.statuses],
                    "backoff": {"base": r.retries.backoff.base, "max": r.retries.backoff.max}},
    }
    if r.split:  # no split means "the cluster's only subset"; {} would not load back
        out["split"] = dict(r.split)
    if r.fault is not None:
        out["fault"] = _fault_to_dict(r.fault)
    if r.mirror is not None:
        out["mirror"] = {"cluster": r.mirror.cluster, "subset": r.mirror.subset,
                         "percent": r.mirror.percent}
    return out


def _cluster_to_dict(c: Cluster) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": c.name, "lb": c.lb, "hash_header": c.hash_header,
        "connect_timeout": c.connect_timeout,
        "subsets": {name: [str(e) for e in eps] for name, eps in c.subsets},
        "circuit_breaker": vars(c.circuit_breaker).copy(),
        "outlier": vars(c.outlier).copy(),
        "retry_budget": vars(c.retry_budget).copy(),
    }
    if c.identity is not None:
        out["identity"] = c.identity
    if not c.mtls:
        out["mtls"] = False
    return out


def _inbound_to_dict(i: Inbound) -> dict[str, Any]:
    out: dict[str, Any] = {
        "timeout": i.timeout,
        "faults": [{"match": _match_to_dict(f.match), **_fault_to_dict(f.fault)}
                   for f in i.faults]}
    if i.mtls is not None:
        out["mtls"] = i.mtls
    if i.tcp is not None:
        out["tcp"] = {"idle_timeout": i.tcp.idle_timeout}
    if i.authz is not None:
        rules = []
        for r in i.authz.rules:
            rule: dict[str, Any] = {"action": r.action}
            for key in ("identity", "namespace", "source"):
                if getattr(r, key) is not None:
                    rule[key] = getattr(r, key)
            if r.path is not None:
                rule["path"] = _string_match_to_dict(r.path)
            if r.methods:
                rule["methods"] = list(r.methods)
            rules.append(rule)
        out["authz"] = {"default": i.authz.default, "rules": rules}
    return out


def _snapshot_to_dict(s: Snapshot) -> dict[str, Any]:
    return {
        "version": s.version,
        "service": s.service,
        "limits": vars(s.limits).copy(),
        "inbound": _inbound_to_dict(s.inbound),
        "services": [{"name": sv.name, "hosts": list(sv.hosts),
                      "routes": [_route_to_dict(r) for r in sv.routes]} for sv in s.services],
        "clusters": [_cluster_to_dict(c) for c in s.clusters],
        "tcp": [vars(t).copy() for t in s.tcp],
    }
