"""End to end: real NATS, a real `mesh controlplane`, real sidecars fed over NATS, real apps.

One topology for the module (productpage's sidecar -> reviews v1 / v2 sidecars -> apps); each
test starts by applying the configuration it needs.
"""

from __future__ import annotations

import signal
from pathlib import Path

from cp_helpers import Mesh

from bus import subjects
from mesh.messages import SnapshotPush

BASE = """
kind: Service
name: reviews
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
  connect_timeout: 0.5
---
kind: Route
name: reviews
spec:
  service: reviews
  rules:
    - name: to-v2
      match: {headers: {x-canary: {exact: "1"}}}
      split: {v2: 100}
    - name: main
      split: {v1: 100}
"""


def apply_base(mesh: Mesh, tmp: Path) -> int:
    (tmp / "base.yaml").write_text(BASE)
    out = mesh.ok("apply", "-f", str(tmp / "base.yaml"), "--wait", "15")
    assert "synced: 3 sidecar(s)" in out
    revision: int = mesh.status()["revision"]
    return revision


def test_sidecars_register_and_sync(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    rows = mesh.rows()
    assert set(rows) == {"productpage", "reviews-v1", "reviews-v2"}
    assert {r["status"] for r in rows.values()} == {"SYNCED"}
    assert rows["reviews-v2"]["address"] == f"127.0.0.1:{mesh.sidecars['reviews-v2']['inbound']}"
    assert rows["productpage"]["admin"] == f"127.0.0.1:{mesh.sidecars['productpage']['admin']}"
    text = mesh.ok("status")
    assert "productpage" in text and "SYNCED" in text and "REASON" in text


def test_a_weight_change_shifts_traffic(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    assert mesh.traffic(40) == {"v1": 40}
    out = mesh.ok("route", "weights", "reviews", "v1=0", "v2=100", "--wait", "15")
    assert "spec.rules[1].split.v1: 100 -> 0" in out and "synced: 3 sidecar(s)" in out
    assert mesh.traffic(40) == {"v2": 40}
    mesh.ok("route", "weights", "reviews", "v1=50", "v2=50", "--wait", "15")
    seen = mesh.traffic(200)
    assert set(seen) == {"v1", "v2"} and min(seen.values()) > 50


def test_an_invalid_file_names_the_error_and_changes_nothing(mesh: Mesh, tmp: Path) -> None:
    revision = apply_base(mesh, tmp)
    before = mesh.ok("get", "route", "reviews", "-o", "json")
    bad = tmp / "bad.yaml"
    bad.write_text(
        BASE.replace("split: {v1: 100}", "split: {v1: 50, v3: 50}")
        + "---\nkind: Service\nname: ratings\nspec: {port: http}\n"
    )
    res = mesh.mesh("apply", "-f", str(bad))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr == (
        f"mesh apply: error: {bad} (document 5): Service/ratings: spec.port: "
        "expected an integer, got a string\n"
    )
    bad.write_text(BASE.replace("split: {v1: 100}", "split: {v1: 50, v3: 50}"))
    res = mesh.mesh("apply", "-f", str(bad))
    assert res.returncode == 1
    assert res.stderr == (
        f"mesh apply: error: {bad} (document 4): Route/reviews: "
        "spec.rules[1].split.v3: subset 'v3' is not defined by the "
        "DestinationPolicy of 'reviews' (has: v1, v2)\n"
    )
    res = mesh.mesh("analyze", "-f", str(bad))
    assert res.returncode == 1 and "split.v3: subset 'v3'" in res.stderr
    assert mesh.ok("get", "route", "reviews", "-o", "json") == before
    assert mesh.status()["revision"] == revision
    assert mesh.traffic(20) == {"v1": 20}


def test_a_config_the_sidecar_cannot_load_is_nacked_and_the_old_one_kept(
    mesh: Mesh, tmp: Path
) -> None:
    apply_base(mesh, tmp)
    current = mesh.rows()["productpage"]["acked"]
    # A delta on the right base whose result the sidecar refuses: a split to a subset its
    # cluster lacks (the control plane would never compile this; a buggy one might).
    bad_route = {"name": "main", "match": {}, "cluster": "reviews", "split": {"v9": 1}}
    delta = {
        "upsert": {"services": [{"name": "reviews", "hosts": ["reviews"], "routes": [bad_route]}]}
    }
    mesh.publish(
        subjects.config_push("productpage"),
        SnapshotPush(
            service="productpage", version="bad-1", base=current, nonce="n1", full=False, body=delta
        ),
    )
    mesh.wait_for("NACKED", lambda: mesh.rows()["productpage"]["status"] == "NACKED")
    row = mesh.rows()["productpage"]
    assert row["acked"] == current
    assert row["reason"] == (
        "refused bad-1: services[0].routes[0].split.v9: subset 'v9' not in "
        "cluster 'reviews' (has: v1, v2)"
    )
    assert "NACKED" in mesh.ok("status") and "subset 'v9'" in mesh.ok("status")
    assert mesh.traffic(20) == {"v1": 20}  # still serving the last good snapshot
    # the next real change heals it
    mesh.ok("route", "weights", "reviews", "v1=0", "v2=100", "--wait", "15")
    assert mesh.rows()["productpage"]["status"] == "SYNCED"
    assert mesh.traffic(10) == {"v2": 10}


def test_a_delta_with_a_wrong_base_triggers_a_full_resync(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    row = mesh.rows()["productpage"]
    mesh.publish(
        subjects.config_push("productpage"),
        SnapshotPush(
            service="productpage",
            version="other",
            base="not-what-it-has",
            nonce="n2",
            full=False,
            body={"set": {"limits": {"max_header_bytes": 300}}},
        ),
    )
    mesh.wait_for("a resync", lambda: mesh.rows()["productpage"]["resyncs"] == row["resyncs"] + 1)
    assert mesh.rows()["productpage"]["acked"] == row["acked"]
    assert mesh.rows()["productpage"]["status"] == "SYNCED"
    assert mesh.traffic(10) == {"v1": 10}
    log = (mesh.tmp / "productpage.stderr").read_text()
    assert "gap: have" in log and "asking for a full snapshot" in log


def test_rollback_restores_the_previous_routes(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    mesh.ok("route", "weights", "reviews", "v1=0", "v2=100", "--wait", "15")
    assert mesh.traffic(10) == {"v2": 10}
    out = mesh.ok("rollback", "--wait", "15")
    assert "spec.rules[1].split.v1: 0 -> 100" in out
    assert mesh.traffic(20) == {"v1": 20}
    assert "v1: 100" in mesh.ok("get", "route", "reviews")
    listing = mesh.ok("rollback", "--list")
    assert "rollback to" in listing and "route weights reviews v1=0 v2=100" in listing
    res = mesh.mesh("rollback", "--to", "99999")
    assert res.returncode == 1 and "revision 99999 is not kept" in res.stderr


def test_traffic_survives_the_control_plane_and_sidecars_resync(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    assert mesh.traffic(50) == {"v1": 50}
    mesh.procs.stop(mesh.cp, signal.SIGKILL)
    assert mesh.traffic(300) == {"v1": 300}  # 0 errors with the control plane gone
    # a change written while it is down is picked up when it returns
    (tmp / "canary.yaml").write_text(BASE.replace("split: {v1: 100}", "split: {v2: 100}"))
    assert "applied: revision" in mesh.ok("apply", "-f", str(tmp / "canary.yaml"))
    assert mesh.traffic(50) == {"v1": 50}
    mesh.start_controlplane()
    mesh.wait_for(
        "resync",
        lambda: {r["status"] for r in mesh.rows().values()} == {"SYNCED"} and len(mesh.rows()) == 3,
    )
    assert mesh.traffic(30) == {"v2": 30}


def test_get_and_delete(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    table = mesh.ok("get", "all")
    assert "Route" in table and "service=reviews rules=2" in table
    assert "split:\n" in mesh.ok("get", "route", "reviews")
    res = mesh.mesh("delete", "service", "reviews")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Route/reviews: spec.service: Service 'reviews' does not exist" in res.stderr
    res = mesh.mesh("get", "dp", "nope")
    assert res.returncode == 1 and "DestinationPolicy/nope does not exist" in res.stderr
    # without its Route, reviews is split equally over the policy's subsets
    assert "- Route/reviews" in mesh.ok("delete", "route", "reviews", "--wait", "15")
    seen = mesh.traffic(100)
    assert set(seen) == {"v1", "v2"}


def test_authorization_policies_reach_the_inbound_sidecar(mesh: Mesh, tmp: Path) -> None:
    apply_base(mesh, tmp)
    (tmp / "authz.yaml").write_text(
        "kind: AuthorizationPolicy\nname: reviews-deny-admin\n"
        "spec: {service: reviews, action: deny, rules: [{path: {prefix: /admin}}]}\n---\n"
        "kind: AuthorizationPolicy\nname: reviews-callers\n"
        "spec: {service: reviews, action: allow, rules: [{source: productpage}]}\n"
    )
    mesh.ok("apply", "-f", str(tmp / "authz.yaml"), "--wait", "15")
    assert mesh.traffic(10) == {"v1": 10}  # productpage is allowed
    assert mesh.traffic(5, "/admin/x") == {"error 403": 5}  # but not to /admin
    (tmp / "authz.yaml").write_text(
        "kind: AuthorizationPolicy\nname: reviews-callers\n"
        "spec: {service: reviews, action: allow, rules: [{source: reviews}]}\n"
    )
    mesh.ok("apply", "-f", str(tmp / "authz.yaml"), "--wait", "15")
    # (the very next request on a pooled keep-alive connection sees the swapped policy)
    assert mesh.traffic(5) == {"error 403": 5}  # productpage is no longer an allowed source
    mesh.ok("delete", "authz", "reviews-callers", "--wait", "15")
    mesh.ok("delete", "authz", "reviews-deny-admin", "--wait", "15")
    assert mesh.traffic(5, "/admin/x") == {"v1": 5}
