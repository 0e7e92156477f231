"""Topology files: strict parsing with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy.topology import load_topology, parse_topology
from deploy.topology_plan import make_plan, topology_resources
from deploy.topology_run import SidecarIdentity, issue_identities, sidecar_argv
from mesh.errors import ConfigError
from mesh.spiffe import SpiffeId

APP = ["{python}", "-m", "x"]


def topo(**service: Any) -> dict[str, Any]:
    return {"name": "t", "services": [{"name": "a", "app": APP, **service}, {"name": "b", "app": APP}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (topo(calls=["c"]), "services[0].calls[0]: no service named 'c'"),
        (topo(versons={"v1": 1}), "services[0].versons: unknown field"),
        (topo(versions={"v1": 0}), "services[0].versions.v1: expected a whole number >= 1"),
        (topo(split={"v2": 1}), "services[0].split.v2: no such version (has: v1)"),
        (topo(split={"v1": 0}), "services[0].split: weights add up to 0"),
        (topo(protocol="udp"), "services[0].protocol: expected http or tcp"),
        (topo(app="python x"), "services[0].app: expected the app's command"),
        ({"name": "t", "services": [{"name": "a", "app": APP}] * 2}, "services[1].name: service 'a' is defined twice"),
        ({"name": "T", "services": []}, "name: 'T' is not a valid name"),
        ({"services": [{"name": "a", "app": APP}], "ingress": {"port": 8080, "service": "z"}}, "ingress.service: no service named 'z'"),
    ],
)
def test_invalid_topologies_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology(data, "f.yaml")
    assert f"f.yaml: {message}" in str(info.value)


def test_bad_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nservices: [\n  {name: a\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: not valid YAML at line \d+"):
        load_topology(path)


def test_defaults() -> None:
    t = parse_topology(topo(versions={"v1": 2, "v2": 1}, calls=["b"]))
    a = t.service("a")
    assert a.protocol == "http" and a.split == (("v1", 1), ("v2", 1)) and a.calls == ("b",)


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "STRICT"), ("strict", "STRICT"), ("PERMISSIVE", "PERMISSIVE"), ("off", "DISABLE"), (False, "DISABLE")],
)
def test_mtls_modes(value: Any, mode: str) -> None:
    # `mtls: off` reaches us as False (YAML 1.1): both spellings turn identities off.
    data = {**topo(), **({} if value is None else {"mtls": value})}
    assert parse_topology(data).mtls == mode


def test_mtls_off_parses_from_yaml_and_reaches_the_control_plane(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nmtls: off\nservices: [{name: a, app: [x]}]\n")
    t = load_topology(path)
    assert t.mtls == "DISABLE"
    policy = next(r for r in topology_resources(t) if r["kind"] == "DestinationPolicy")
    assert policy["spec"]["mtls"] == "disable"


def test_bad_mtls_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"f\.yaml: mtls: expected strict, permissive or off, got 'maybe'"):
        parse_topology({**topo(), "mtls": "maybe"}, "f.yaml")


async def test_mtls_off_issues_no_tokens(tmp_path: Path) -> None:
    plan = make_plan(parse_topology({**topo(), "mtls": False}), iter(range(20000, 21000)).__next__)
    ids = await issue_identities(plan, tmp_path, ["nats://127.0.0.1:1"])  # never dialled
    assert ids.by_account == {} and not (tmp_path / "tokens").exists()


def test_sidecar_gets_its_token_by_file_only(tmp_path: Path) -> None:
    plan = make_plan(parse_topology(topo(calls=["b"])), iter(range(20000, 21000)).__next__)
    inst = plan.by_service("a")[0]
    ident = SidecarIdentity(SpiffeId("mesh.local", "t", "a"), tmp_path / "a.token", "STRICT")
    argv = sidecar_argv(inst, tmp_path / "a.json", ["nats://127.0.0.1:4222"], ident)
    assert argv[argv.index("--identity") + 1] == "spiffe://mesh.local/ns/t/sa/a"
    assert argv[argv.index("--token-file") + 1] == str(tmp_path / "a.token")
    assert argv[argv.index("--mtls") + 1] == "STRICT" and "--token" not in argv
