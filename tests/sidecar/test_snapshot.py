"""The proxy snapshot: parsing, consistency checks with field paths, round trip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.errors import ConfigError
from mesh.snapshot import Snapshot, load_snapshot

DOC = Path(__file__).parents[2] / "docs" / "snapshot.md"


def _base() -> dict[str, Any]:
    return {
        "version": "7",
        "services": [{"name": "reviews", "hosts": ["reviews", "reviews.default"], "routes": [
            {"name": "jason", "match": {"headers": {"x-user": {"exact": "jason"},
                                                    "x-debug": {"present": True}},
                                        "path": {"regex": "/api/.*"}, "methods": ["get"],
                                        "source": "productpage"},
             "split": {"v2": 1}},
            {"split": {"v1": 95, "v2": 5}, "timeout": 2, "retries": {
                "attempts": 3, "per_try_timeout": 0.5, "on": ["connect-failure", 503]},
             "fault": {"abort": {"percent": 5, "status": 503}},
             "mirror": {"subset": "v2", "percent": 10}},
        ]}],
        "clusters": [{"name": "reviews", "lb": "least_request", "subsets": {
            "v1": ["127.0.0.1:9001"], "v2": ["127.0.0.1:9002", "10.0.0.2:9002"]},
            "outlier": {"consecutive_5xx": 3}, "circuit_breaker": {"max_requests": 10}}],
        "inbound": {"timeout": 3, "faults": [{"match": {"source": "x"},
                                              "delay": {"percent": 10, "seconds": 1}}]},
        "tcp": [{"name": "db", "port": 5432, "cluster": "reviews", "subset": "v1"}],
    }


def test_parse_and_round_trip() -> None:
    snap = Snapshot.from_dict(_base())
    assert snap.version == "7"
    route = snap.services[0].routes[0]
    assert route.match.methods == ("GET",)
    assert snap.services[0].routes[1].retries.statuses == (503,)
    assert snap.clusters[0].subset("v2") is not None
    mirror = snap.services[0].routes[1].mirror
    assert mirror is not None and (mirror.cluster, mirror.subset, mirror.percent) == (
        "reviews", "v2", 10.0)
    assert snap.services[0].routes[0].mirror is None
    again = Snapshot.from_dict(json.loads(json.dumps(snap.to_dict())))
    assert again == snap


def test_documented_example_loads(tmp_path: Path) -> None:
    text = DOC.read_text()
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.yaml").write_text(example)
    snap = load_snapshot(tmp_path / "example.yaml")
    assert snap.version == "2026-11-26.1"
    assert [c.name for c in snap.clusters] == ["reviews", "redis"]
    assert snap.to_dict()["services"][0]["routes"][1]["split"] == {"v1": 95, "v2": 5}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["services"][0]["routes"][1].update(cluster="nope"),
     "services[0].routes[1].cluster: cluster 'nope' does not exist"),
    (lambda d: d["services"][0]["routes"][1]["split"].update(v3=1),
     "services[0].routes[1].split.v3: subset 'v3' not in cluster 'reviews' (has: v1, v2)"),
    (lambda d: d["services"][0]["routes"][0]["match"]["path"].update(regex="("),
     "services[0].routes[0].match.path.regex: invalid regular expression"),
    (lambda d: d["clusters"][0]["subsets"]["v1"].append("nohost"),
     "clusters[0].subsets.v1[1]: endpoint 'nohost' is not host:port"),
    (lambda d: d["services"][0]["routes"][1]["mirror"].update(subset="v9"),
     "services[0].routes[1].mirror.subset: subset 'v9' not in cluster 'reviews' (has: v1, v2)"),
    (lambda d: d["services"][0]["routes"][1]["mirror"].update(cluster="shadow"),
     "services[0].routes[1].mirror.cluster: cluster 'shadow' does not exist (have: reviews)"),
    (lambda d: d["services"][0]["routes"][1]["mirror"].pop("subset"),
     "services[0].routes[1].mirror: missing required field 'subset'"),
    (lambda d: d["services"][0]["routes"][1]["mirror"].update(percent=150),
     "services[0].routes[1].mirror.percent: 150.0 is out of range"),
    (lambda d: d["services"][0]["routes"][1]["mirror"].update(weight=1),
     "services[0].routes[1].mirror: unknown field(s) weight"),
    (lambda d: d["clusters"][0].update(lb="random"), "clusters[0].lb: unknown policy 'random'"),
    (lambda d: d["clusters"][0].update(lb="hash"), "clusters[0]: lb 'hash' needs 'hash_header'"),
    (lambda d: d.update(colour="blue"), "<top>: unknown field(s) colour"),
    (lambda d: d.pop("version"), "<top>: missing required field 'version'"),
    (lambda d: d["services"][0]["routes"][1]["fault"]["abort"].update(percent=101),
     "services[0].routes[1].fault.abort.percent: 101.0 is out of range"),
    (lambda d: d["services"][0]["routes"][1]["retries"].update(on=["sometimes"]),
     "services[0].routes[1].retries.on[0]: unknown retry condition 'sometimes'"),
    (lambda d: d["tcp"][0].update(subset="v9"), "tcp[0]: subset 'v9' not in cluster 'reviews'"),
    (lambda d: d["clusters"].append(d["clusters"][0]), "clusters[1].name: duplicate cluster"),
    (lambda d: d["services"].append({"name": "x", "hosts": ["reviews"], "routes": []}),
     "services[1]: host 'reviews' is already served by service 'reviews'"),
    (lambda d: d["services"][0]["routes"][1].update(split={"v1": 0}),
     "services[0].routes[1].split: weights must add up to more than 0"),
    (lambda d: d["services"][0]["routes"][1].update(split=None),
     "services[0].routes[1].split: required because cluster 'reviews' has 2 subsets"),
    (lambda d: d["clusters"][0]["circuit_breaker"].update(max_requests="ten"),
     "clusters[0].circuit_breaker.max_requests: expected an integer, got a string"),
    (lambda d: d.update(services={"reviews": 1}), "services: expected a list, got a mapping"),
])
def test_errors_name_the_field(mutate: Any, message: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        Snapshot.from_dict(data)
    assert message in str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"version": "1", "clusters": [{"name": "c"}]}))
    with pytest.raises(ConfigError, match=r"s\.yaml: clusters\[0\]: missing required field"):
        load_snapshot(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping, got a list"):
        load_snapshot(p)
    j = tmp_path / "s.json"
    j.write_text("{not json")
    with pytest.raises(ConfigError, match=r"s\.json: not valid JSON"):
        load_snapshot(j)
    j.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_snapshot(j)
    with pytest.raises(ConfigError, match="cannot read snapshot"):
        load_snapshot(tmp_path / "absent.yaml")


def test_snapshot_is_immutable() -> None:
    snap = Snapshot.from_dict(_base())
    with pytest.raises(AttributeError):
        snap.version = "8"  # type: ignore[misc]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=8) | st.sampled_from(["v1", "reviews", "127.0.0.1:80", "hash", "("]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["version", "services", "clusters", "routes", "name", "split", "match",
                         "subsets", "headers", "path", "retries", "on", "fault", "abort",
                         "percent", "status", "lb", "tcp", "inbound", "faults", "limits",
                         "exact", "regex", "port", "cluster", "subset", "timeout"])
        | st.text(max_size=5), inner, max_size=5),
    max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(JSONISH)
def test_any_input_gives_a_snapshot_or_a_config_error(data: Any) -> None:
    try:
        Snapshot.from_dict(data)
    except ConfigError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_snapshots_give_a_snapshot_or_a_config_error(data: st.DataObject) -> None:
    doc = _base()
    for _ in range(data.draw(st.integers(1, 4))):
        node: Any = doc
        while isinstance(node, dict | list) and node:
            keys = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
            key = data.draw(st.sampled_from(keys))
            if data.draw(st.booleans()) or not isinstance(node[key], dict | list):
                node[key] = data.draw(JSONISH)
                break
            node = node[key]
    try:
        Snapshot.from_dict(doc)
    except ConfigError as exc:
        assert str(exc)


def test_to_dict_loads_back_to_the_same_snapshot() -> None:
    from mesh.snapshot import Snapshot

    data = {
        "version": "1",
        "services": [{"name": "a", "routes": [{"name": "only"}]}],  # no split: one subset
        "clusters": [{"name": "a", "subsets": {"v1": ["127.0.0.1:1"]}}],
    }
    snap = Snapshot.from_dict(data)
    assert Snapshot.from_dict(snap.to_dict()) == snap
