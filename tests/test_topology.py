"""Topology files: strict parsing with errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deploy.topology import load_topology, parse_topology
from mesh.errors import ConfigError

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
