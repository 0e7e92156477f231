"""MeshConfig `cert_ttl_hours` and `trust_domain` reach the CA: real nats-server, the real CA
actor, real CSRs, and the resources written through the same path as `mesh apply`."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from identity_bus_helpers import TD, Mesh, running_mesh

from bus import subjects
from bus.server import NatsServer
from mesh import pki
from mesh.cli.apply_cmd import change_config
from mesh.errors import ConfigError
from mesh.messages import CaCommand, CaCommandReply, CsrReply, CsrRequest
from mesh.resources import Resource, ResourceSet, merged
from mesh.resources_store import Revision, Store
from mesh.spiffe import SpiffeId
from sidecar.identity import IdentityAgent

CHECKOUT = SpiffeId(TD, "shop", "checkout")
# The leaf starts 30 s before it is signed (clock skew allowance), so its whole span is
# TTL + 30 s; allow a little more for the time the test itself takes.
SLACK = timedelta(seconds=90)


def meshconfig(**spec: object) -> Resource:
    return Resource("MeshConfig", "default", dict(spec))


async def apply(mesh_url: str, *resources: Resource) -> None:
    """What `mesh apply -f` does once it has parsed the files."""
    args = argparse.Namespace(nats=mesh_url, wait=0.0)

    def change(current: Revision) -> tuple[ResourceSet, str]:
        return merged(current.resources, resources), "test"

    await change_config(args, change, out=_Sink())


async def delete_meshconfig(mesh_url: str) -> None:
    args = argparse.Namespace(nats=mesh_url, wait=0.0)

    def change(current: Revision) -> tuple[ResourceSet, str]:
        return {k: r for k, r in current.resources.items() if r.kind != "MeshConfig"}, "rm"

    await change_config(args, change, out=_Sink())


class _Sink:
    def write(self, text: str) -> int:
        return len(text)


def span(chain_der: list[bytes]) -> timedelta:
    leaf = pki.IssuedSvid.from_der(chain_der)
    return leaf.not_after - leaf.not_before


def life(agent: IdentityAgent) -> timedelta:
    return agent.svid.not_after - agent.svid.issued.not_before


def close_to(got: timedelta, want: timedelta) -> bool:
    return abs(got - want) < SLACK


async def ca_sees(mesh: Mesh, ttl: timedelta) -> None:
    with trio.fail_after(10):
        while mesh.ca.leaf_ttl() != ttl:
            await trio.sleep(0.02)


async def test_applied_cert_ttl_hours_sets_new_leaves_and_renewals(
    nats_server: NatsServer,
) -> None:
    async with running_mesh(nats_server.url, leaf_ttl=timedelta(hours=1)) as mesh:
        before = await mesh.agent("shop", "checkout")
        assert close_to(life(before), timedelta(hours=1))

        await apply(nats_server.url, meshconfig(cert_ttl_hours=2))
        await ca_sees(mesh, timedelta(hours=2))

        # A first certificate (join token) after the apply: 2 h.
        fresh = await mesh.agent("shop", "reviews")
        assert close_to(life(fresh), timedelta(hours=2)), life(fresh)

        # A renewal of a leaf issued before the apply: 2 h too; the old leaf keeps its expiry.
        key = pki.generate_key()
        csr = pki.build_csr(key, CHECKOUT)
        req = CsrRequest(
            CHECKOUT.uri,
            csr,
            chain=list(before.svid.issued.chain_der),
            proof=pki.renewal_proof(before.svid, csr),
        )
        reply = await mesh.bus.request(subjects.CA_SIGN, req, CsrReply, timeout=5)
        assert reply.ok, reply.message
        assert abs(span(reply.chain) - timedelta(hours=2)) < SLACK
        assert close_to(life(before), timedelta(hours=1))

        # Without cert_ttl_hours the CA's own setting applies again.
        await delete_meshconfig(nats_server.url)
        await ca_sees(mesh, timedelta(hours=1))
        again = await mesh.agent("shop", "ratings")
        assert close_to(life(again), timedelta(hours=1)), life(again)


async def test_meshconfig_applied_before_the_ca_starts_governs_its_first_leaf(
    nats_server: NatsServer,
) -> None:
    # `mesh apply` needs NATS only: the config can be there before any CA.
    await apply(nats_server.url, meshconfig(cert_ttl_hours=3))
    async with running_mesh(nats_server.url, leaf_ttl=timedelta(hours=1)) as mesh:
        assert mesh.ca.leaf_ttl() == timedelta(hours=3)
        agent = await mesh.agent("shop", "checkout")
        assert close_to(life(agent), timedelta(hours=3)), life(agent)


async def test_apply_refuses_a_trust_domain_other_than_the_cas(
    mesh: Mesh, nats_server: NatsServer, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        await apply(nats_server.url, meshconfig(trust_domain="example.org", cert_ttl_hours=2))
    text = str(err.value)
    assert "spec.trust_domain" in text and "'example.org'" in text and f"'{TD}'" in text
    # Nothing was written: the TTL of the refused batch did not take effect either.
    store = await Store.open(mesh.bus)
    assert (await store.current()).revision == 0
    assert mesh.ca.leaf_ttl() == timedelta(hours=1)
    # What the user sees from the real command: one line, naming the file, field and values.
    bad = tmp_path / "mesh.yaml"
    bad.write_text("kind: MeshConfig\nname: default\nspec: {trust_domain: example.org}\n")
    mesh_cli = str(Path(sys.executable).parent / "mesh")
    res = await trio.run_process(
        [mesh_cli, "apply", "-f", str(bad), "--nats", nats_server.url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert res.returncode == 1 and b"Traceback" not in res.stderr
    assert res.stderr.decode() == (
        f"mesh apply: error: {bad}: MeshConfig/default: spec.trust_domain: 'example.org' is "
        f"not the trust domain of the running CA, '{TD}'; changing a mesh's trust domain "
        f"needs a new root, which `mesh apply` does not make: set spec.trust_domain to "
        f"'{TD}' or leave it out\n"
    )
    # The CA's own trust domain is accepted.
    await apply(nats_server.url, meshconfig(trust_domain=TD, cert_ttl_hours=2))
    await ca_sees(mesh, timedelta(hours=2))


async def test_ca_refuses_a_stored_foreign_trust_domain_and_keeps_its_own(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Written before any CA existed (so `mesh apply` could not compare): the CA must refuse it.
    await apply(nats_server.url, meshconfig(trust_domain="example.org", cert_ttl_hours=2))
    caplog.set_level(logging.INFO, logger="mesh.ca")
    async with running_mesh(nats_server.url, leaf_ttl=timedelta(hours=1)) as mesh:
        problem = mesh.ca.mesh_config_problem
        assert "spec.trust_domain" in problem and "'example.org'" in problem
        assert f"'{TD}'" in problem
        assert any("example.org" in r.getMessage() for r in caplog.records if r.name == "mesh.ca")
        # It keeps signing for its own trust domain; the TTL of the same MeshConfig holds.
        agent = await mesh.agent("shop", "checkout")
        assert agent.svid.identity.trust_domain == TD
        assert close_to(life(agent), timedelta(hours=2)), life(agent)
        status = await mesh.bus.request(
            subjects.CA_COMMAND, CaCommand(action="status"), CaCommandReply, timeout=5
        )
        assert status.ok and status.trust_domain == TD and "example.org" in status.message
        # Fixing the MeshConfig clears the refusal.
        await apply(nats_server.url, meshconfig(trust_domain=TD, cert_ttl_hours=2))
        with trio.fail_after(10):
            while mesh.ca.mesh_config_problem:
                await trio.sleep(0.02)
