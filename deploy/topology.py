"""Topology files: which services run, in which versions and how many, and how to start them.

A topology is what `mesh up --topology FILE` brings up on one host: for every
instance an app process and a sidecar next to it. It is validated strictly;
every error names the file and the field path.

    name: demo
    mtls: strict                                  # strict (default) | permissive | off
    ingress: {port: 8080, service: frontend}     # optional: a sidecar that accepts outside traffic
    services:
      - name: catalog
        protocol: http                            # http (default) | tcp (opaque bytes)
        versions: {v1: 1, v2: 1}                  # version -> replicas
        split: {v1: 90, v2: 10}                   # optional initial weights (default: equal)
        calls: [ratings, stock]                   # services this one calls
        app: [python, -m, deploy.demo.app, --role, catalog, --port, "{port}", --version, "{version}"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.errors import ConfigError

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PLACEHOLDERS = ("{port}", "{version}", "{service}", "{instance}", "{python}")
# Inbound mTLS between the topology's sidecars. YAML 1.1 reads a bare `off` as false, so
# both spellings mean "no identities, plaintext" (the sidecars' DISABLE).
_MTLS = {"strict": "STRICT", "permissive": "PERMISSIVE", "off": "DISABLE", "disable": "DISABLE"}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    protocol: str
    versions: tuple[tuple[str, int], ...]
    split: tuple[tuple[str, int], ...]
    calls: tuple[str, ...]
    app: tuple[str, ...]


@dataclass(frozen=True)
class Ingress:
    port: int
    service: str


@dataclass(frozen=True)
class Topology:
    name: str
    services: tuple[ServiceSpec, ...]
    ingress: Ingress | None = None
    mtls: str = "STRICT"  # STRICT | PERMISSIVE | DISABLE (no identities at all)

    def service(self, name: str) -> ServiceSpec:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


def _fail(where: str, path: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {path}: {problem}")


def _check_keys(where: str, path: str, node: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in node:
        if key not in allowed:
            raise _fail(
                where,
                f"{path}.{key}" if path else str(key),
                f"unknown field (allowed: {', '.join(allowed)})",
            )


def _name(where: str, path: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _fail(
            where, path, f"{value!r} is not a valid name (lowercase letters, digits and '-')"
        )
    return value


def _weights(where: str, path: str, node: Any, *, minimum: int) -> tuple[tuple[str, int], ...]:
    if not isinstance(node, dict) or not node:
        raise _fail(where, path, "expected a map of version -> number")
    out = []
    for key, value in node.items():
        _name(where, f"{path}.{key}", key)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _fail(
                where, f"{path}.{key}", f"expected a whole number >= {minimum}, got {value!r}"
            )
        out.append((key, value))
    return tuple(out)


def parse_topology(data: Any, where: str = "topology") -> Topology:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a map at the top level")
    _check_keys(where, "", data, ("name", "mtls", "services", "ingress"))
    name = _name(where, "name", data.get("name", "mesh"))
    raw_mtls = data.get("mtls", "strict")
    mtls = "DISABLE" if raw_mtls is False else _MTLS.get(str(raw_mtls).lower())
    if mtls is None:
        raise _fail(where, "mtls", f"expected strict, permissive or off, got {raw_mtls!r}")
    raw_services = data.get("services")
    if not isinstance(raw_services, list) or not raw_services:
        raise _fail(where, "services", "expected a non-empty list")
    services: list[ServiceSpec] = []
    for i, node in enumerate(raw_services):
        path = f"services[{i}]"
        if not isinstance(node, dict):
            raise _fail(where, path, "expected a map")
        _check_keys(where, path, node, ("name", "protocol", "versions", "split", "calls", "app"))
        sname = _name(where, f"{path}.name", node.get("name"))
        protocol = node.get("protocol", "http")
        if protocol not in ("http", "tcp"):
            raise _fail(where, f"{path}.protocol", f"expected http or tcp, got {protocol!r}")
        versions = _weights(where, f"{path}.versions", node.get("versions", {"v1": 1}), minimum=1)
        split = (
            _weights(where, f"{path}.split", node["split"], minimum=0)
            if "split" in node
            else tuple((v, 1) for v, _ in versions)
        )
        known = {v for v, _ in versions}
        for v, _ in split:
            if v not in known:
                raise _fail(
                    where, f"{path}.split.{v}", f"no such version (has: {', '.join(sorted(known))})"
                )
        if sum(w for _, w in split) == 0:
            raise _fail(where, f"{path}.split", "weights add up to 0")
        calls = node.get("calls", [])
        if not isinstance(calls, list):
            raise _fail(where, f"{path}.calls", "expected a list of service names")
        app = node.get("app")
        if not isinstance(app, list) or not app or not all(isinstance(a, (str, int)) for a in app):
            raise _fail(where, f"{path}.app", "expected the app's command as a list of strings")
        services.append(
            ServiceSpec(
                sname,
                protocol,
                versions,
                split,
                tuple(_name(where, f"{path}.calls[{j}]", c) for j, c in enumerate(calls)),
                tuple(str(a) for a in app),
            )
        )
    names = [s.name for s in services]
    for i, s in enumerate(services):
        if s.name in names[:i]:
            raise _fail(where, f"services[{i}].name", f"service {s.name!r} is defined twice")
        for j, callee in enumerate(s.calls):
            if callee not in names:
                raise _fail(where, f"services[{i}].calls[{j}]", f"no service named {callee!r}")
    ingress = None
    if "ingress" in data:
        node = data["ingress"]
        if not isinstance(node, dict):
            raise _fail(where, "ingress", "expected a map with port and service")
        _check_keys(where, "ingress", node, ("port", "service"))
        port = node.get("port")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise _fail(where, "ingress.port", f"expected a port number, got {port!r}")
        target = _name(where, "ingress.service", node.get("service"))
        if target not in names:
            raise _fail(where, "ingress.service", f"no service named {target!r}")
        ingress = Ingress(port, target)
    return Topology(name, tuple(services), ingress, mtls)


def load_topology(path: Path) -> Topology:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read topology {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return parse_topology(data, str(path))


def demo_topology_path() -> Path:
    return Path(__file__).parent / "demo" / "topology.yaml"
