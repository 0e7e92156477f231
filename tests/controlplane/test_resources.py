"""Resources: strict validation with file, resource and field path; whole-set references."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.errors import ConfigError
from mesh.resources import (
    Resource,
    ResourceSet,
    check_trust_domain,
    decode_set,
    diff,
    encode_set,
    kind_of,
    load_paths,
    merged,
    parse_text,
    validate_set,
)

GOOD = """
kind: Service
name: reviews
spec: {hosts: [reviews.default]}
---
kind: Service
name: productpage
spec: {dependencies: [reviews]}
---
kind: DestinationPolicy
name: reviews
spec:
  service: reviews
  subsets: {v1: {version: v1}, v2: {version: v2}}
  lb: least_request
  connection_limits: {max_requests: 100}
  outlier: {consecutive_5xx: 3}
  mtls: strict
---
kind: Route
name: reviews
spec:
  service: reviews
  rules:
    - name: jason
      match: {headers: {x-user: {exact: jason}}, source: productpage}
      split: {v2: 100}
    - split: {v1: 95, v2: 5}
      timeout: 2
      retries: {attempts: 3, on: [connect-failure, 503], backoff: {base: 0.01}}
      fault: {delay: {percent: 1, seconds: 0.2}}
---
kind: AuthorizationPolicy
name: reviews-from-pp
spec: {service: reviews, action: allow, rules: [{source: productpage, methods: [get]}]}
---
kind: MeshConfig
name: default
spec: {trust_domain: example.org, defaults: {timeout: 5, retries: {attempts: 2}}}
"""


def as_set(text: str, source: str = "mesh.yaml") -> ResourceSet:
    return {r.key: r for r in parse_text(text, source)}


def test_a_full_example_is_valid_and_round_trips() -> None:
    resources = {r.key: r for r in parse_text(GOOD, "mesh.yaml")}
    validate_set(resources)
    assert len(resources) == 6
    route = resources[("Route", "reviews")]
    assert route.spec["rules"][1]["split"] == {"v1": 95, "v2": 5}
    auth = resources[("AuthorizationPolicy", "reviews-from-pp")]
    assert auth.spec["rules"][0]["methods"] == ["GET"]
    again, note = decode_set(encode_set(resources, "first"))
    assert again == resources and note == "first"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{split: {v1: 1}, retry: {}}]}",
            "f.yaml: Route/r: spec.rules[0]: unknown field(s) retry (allowed: name, match, split, "
            "timeout, retries, fault, mirror)",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{mirror: {percent: 5}}]}",
            "f.yaml: Route/r: spec.rules[0].mirror: missing required field 'subset'",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{mirror: {subset: v2, "
            "percent: 101}}]}",
            "f.yaml: Route/r: spec.rules[0].mirror.percent: 101 is out of range 0..100",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{mirror: {subset: v2, "
            "host: x}}]}",
            "f.yaml: Route/r: spec.rules[0].mirror: unknown field(s) host (allowed: subset, "
            "percent)",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{timeout: fast}]}",
            "f.yaml: Route/r: spec.rules[0].timeout: expected a number, got a string",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: []}",
            "f.yaml: Route/r: spec.rules: needs at least 1 item(s)",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{split: {v1: 0}}]}",
            "f.yaml: Route/r: spec.rules[0].split: weights must add up to more than 0",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{match: {path: {regex: '('}}}]}",
            "f.yaml: Route/r: spec.rules[0].match.path.regex: invalid regular expression",
        ),
        (
            "kind: Route\nname: r\nspec: {rules: [{}]}",
            "f.yaml: Route/r: spec: missing required field 'service'",
        ),
        ("kind: Routes\nname: r", "f.yaml: kind: 'Routes' is not one of Service, Route"),
        ("kind: Service\nname: Reviews_1", "f.yaml: Service: name: 'Reviews_1' is not a valid"),
        (
            "kind: Service\nname: a\nspec: {port: 70000}",
            "f.yaml: Service/a: spec.port: 70000 is out of range 1..65535",
        ),
        (
            "kind: Service\nname: a\nmetadata: {}",
            "f.yaml: Service/a: unknown field(s) metadata (allowed: kind, name, spec)",
        ),
        ("kind: MeshConfig\nname: mine", "f.yaml: MeshConfig/mine: name: a MeshConfig must be"),
        (
            "kind: MeshConfig\nname: default\nspec: {trust_domain: Example.org}",
            "f.yaml: MeshConfig/default: spec.trust_domain: trust domain 'Example.org' contains "
            "'E': only lowercase letters",
        ),
        (
            "kind: MeshConfig\nname: default\nspec: {trust_domain: 'example.org:8080'}",
            "f.yaml: MeshConfig/default: spec.trust_domain: trust domain 'example.org:8080' "
            "contains ':'",
        ),
        (
            "kind: MeshConfig\nname: default\nspec: {cert_ttl_hours: 2h}",
            "f.yaml: MeshConfig/default: spec.cert_ttl_hours: expected a number, got a string",
        ),
        (
            "kind: MeshConfig\nname: default\nspec: {cert_ttl_hours: 0}",
            "f.yaml: MeshConfig/default: spec.cert_ttl_hours: 0 is out of range 0.1..8784",
        ),
        (
            "kind: DestinationPolicy\nname: d\nspec: {service: x, lb: random}",
            "f.yaml: DestinationPolicy/d: spec.lb: 'random' is not one of round_robin",
        ),
        (
            "kind: Route\nname: r\nspec: {service: reviews, rules: [{retries: {on: [teapot]}}]}",
            "f.yaml: Route/r: spec.rules[0].retries.on[0]: unknown retry condition 'teapot'",
        ),
    ],
)
def test_each_mistake_names_file_resource_and_field(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_text(doc, "f.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_broken_references_are_all_reported() -> None:
    resources = as_set(GOOD)
    bad = parse_text(
        "kind: Route\nname: reviews\nspec: {service: reviews, rules: [{split: {v3: 1}}, "
        "{match: {source: nobody}}]}\n---\n"
        "kind: DestinationPolicy\nname: ghost\nspec: {service: ghost}\n",
        "bad.yaml",
    )
    with pytest.raises(ConfigError) as err:
        validate_set(merged(resources, bad))
    lines = str(err.value).splitlines()
    assert (
        "bad.yaml (document 1): Route/reviews: spec.rules[0].split.v3: subset 'v3' is not "
        "defined by the DestinationPolicy of 'reviews' (has: v1, v2)"
    ) in lines
    assert any("spec.rules[1].match.source: Service 'nobody' does not exist" in x for x in lines)
    assert any(
        x.startswith(
            "bad.yaml (document 2): DestinationPolicy/ghost: spec.service: "
            "Service 'ghost' does not exist"
        )
        for x in lines
    )


def test_a_mirror_subset_must_be_defined_by_the_destination_policy() -> None:
    resources = as_set(GOOD)
    good = parse_text(
        "kind: Route\nname: reviews\nspec: {service: reviews, rules: [{split: {v1: 1}, "
        "mirror: {subset: v2, percent: 10}}]}",
        "ok.yaml",
    )
    validate_set(merged(resources, good))
    assert good[0].spec["rules"][0]["mirror"] == {"subset": "v2", "percent": 10}
    bad = parse_text(
        "kind: Route\nname: reviews\nspec: {service: reviews, rules: [{split: {v1: 1}, "
        "mirror: {subset: v3}}]}",
        "bad.yaml",
    )
    with pytest.raises(ConfigError) as err:
        validate_set(merged(resources, bad))
    assert str(err.value) == (
        "bad.yaml: Route/reviews: spec.rules[0].mirror.subset: subset 'v3' is not defined "
        "by the DestinationPolicy of 'reviews' (has: v1, v2)"
    )
    nodp = parse_text(
        "kind: Service\nname: a\n---\nkind: Route\nname: a\nspec: {service: a, rules: "
        "[{mirror: {subset: v2}}]}",
        "nodp.yaml",
    )
    with pytest.raises(ConfigError) as err:
        validate_set(as_set_of(nodp))
    assert "Route/a: spec.rules[0].mirror.subset: Service 'a' has no DestinationPolicy" in str(
        err.value
    )


def as_set_of(resources: list[Resource]) -> ResourceSet:
    return {r.key: r for r in resources}


def test_a_split_needs_a_destination_policy_and_one_route_per_service() -> None:
    text = (
        "kind: Service\nname: a\n---\nkind: Route\nname: r1\nspec: {service: a, rules: "
        "[{split: {v1: 1}}]}\n---\nkind: Route\nname: r2\nspec: {service: a, rules: [{}]}"
    )
    with pytest.raises(ConfigError) as err:
        validate_set(as_set(text))
    msg = str(err.value)
    assert "Route/r1: spec.rules[0].split.v1: Service 'a' has no DestinationPolicy" in msg
    assert "Route/r2: spec.service: Service 'a' already has Route/r1 (one per service)" in msg


def test_load_paths_reads_a_directory_and_refuses_duplicates(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "notes.txt").write_text("ignored")
    assert len(load_paths([tmp_path])) == 6
    (tmp_path / "b.yml").write_text("kind: Service\nname: reviews\n")
    with pytest.raises(ConfigError, match=r"b.yml: Service/reviews: defined twice \(also in"):
        load_paths([tmp_path])
    (tmp_path / "c.yaml").write_text("kind: [\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not valid YAML"):
        load_paths([tmp_path / "c.yaml"])


def test_diff_names_changed_fields() -> None:
    old = as_set(GOOD)
    new_route = parse_text(
        GOOD.split("---")[3].replace("v1: 95, v2: 5", "v1: 50, v2: 50"), "r.yaml"
    )
    new = merged(old, new_route)
    del new[("MeshConfig", "default")]
    lines = diff(old, new)
    assert lines == [
        "- MeshConfig/default",
        "~ Route/reviews",
        "    spec.rules[1].split.v1: 95 -> 50",
        "    spec.rules[1].split.v2: 5 -> 50",
    ]


def test_kind_aliases() -> None:
    assert kind_of("dp") == "DestinationPolicy" and kind_of("Route") == "Route"
    with pytest.raises(ConfigError, match="unknown kind 'pods'"):
        kind_of("pods")


def test_a_meshconfig_trust_domain_must_be_the_cas() -> None:
    applied = as_set("kind: MeshConfig\nname: default\nspec: {trust_domain: example.org}", "m.yaml")
    check_trust_domain(applied, "example.org")
    check_trust_domain({}, "mesh.local")
    with pytest.raises(ConfigError) as err:
        check_trust_domain(applied, "mesh.local")
    assert str(err.value).startswith(
        "m.yaml: MeshConfig/default: spec.trust_domain: 'example.org' is not the trust domain "
        "of the running CA, 'mesh.local'"
    )
    # Already stored (before any CA ran): unrelated changes are not blocked by it; a new
    # value is checked.
    check_trust_domain(applied, "mesh.local", stored=applied)
    other = as_set("kind: MeshConfig\nname: default\nspec: {trust_domain: other.org}")
    with pytest.raises(ConfigError, match=r"'other\.org' is not the trust domain"):
        check_trust_domain(other, "mesh.local", stored=applied)


def test_a_stored_set_stays_readable_when_a_later_rule_is_stricter() -> None:
    """A trust_domain stored before its syntax was checked must still load: an unreadable
    stored set used to leave the control plane compiling from nothing."""
    import json

    from mesh.resources import decode_set

    stored = json.dumps({"resources": [{"kind": "MeshConfig", "name": "default",
                                        "spec": {"trust_domain": "Cluster.Local:8080"}}]})
    resources, _ = decode_set(stored.encode())
    assert resources[("MeshConfig", "default")].spec["trust_domain"] == "Cluster.Local:8080"
    with pytest.raises(ConfigError, match="trust domain"):  # a new apply is still checked
        as_set("kind: MeshConfig\nname: default\nspec: {trust_domain: Cluster.Local}")


@pytest.mark.parametrize("data", [b'{"resources": null}', b'{"resources": 5}',
                                  b"[" * 100_000, b'{"resources": [5]}', b"\xff"])
def test_a_malformed_stored_set_is_a_config_error(data: bytes) -> None:
    from mesh.resources import decode_set

    with pytest.raises(ConfigError, match="stored"):
        decode_set(data)
