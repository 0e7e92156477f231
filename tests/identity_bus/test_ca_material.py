"""Where the CA's material lives: operator CA files, the sealed key in KV, nothing in clear on
the bus, and a standby with the wrong operator secret refusing to sign."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from identity_bus_helpers import SECRET, TD, running_mesh

from actors.ca import CaActor, signing_root
from actors.ca_config import CaConfig, CaConfigError, ensure_embedded_secret, parse_duration
from actors.runtime import ActorContext
from bus import subjects
from bus.client import connect
from bus.kv import open_kv
from bus.server import NatsServer
from mesh import pki
from mesh.cli.token_cmd import create_token
from mesh.pki_errors import SealError
from mesh.spiffe import SpiffeId
from sidecar.identity import IdentityAgent


def der(key: object) -> bytes:
    return key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())  # type: ignore[attr-defined, no-any-return]


async def test_no_private_key_crosses_nats_in_clear(nats_server: NatsServer) -> None:
    """Everything on the wire (requests, replies, bundles, KV writes and reads) is captured."""
    payloads: list[bytes] = []
    async with connect(nats_server.url) as spy_bus:
        async with spy_bus.subscribe_raw(">", capacity=100_000) as spy:

            async def record() -> None:
                async for delivery in spy:
                    payloads.append(delivery.body)

            async with trio.open_nursery() as spying:
                spying.start_soon(record)
                async with running_mesh(nats_server.url) as mesh:
                    agent = await mesh.agent("shop", "checkout")
                    assert mesh.ca.ca is not None
                    ca_key = der(mesh.ca.ca.key)
                    agent_key = der(agent.svid.key)
                    await spy_bus.flush()
                spying.cancel_scope.cancel()
    wire = b"".join(payloads)
    assert len(payloads) > 5 and agent.svid.issued.chain_der[0] in wire  # the spy saw traffic
    assert ca_key not in wire and agent_key not in wire
    async with connect(nats_server.url) as bus:
        kv = await open_kv(bus, subjects.KV_CA)
        entry = await kv.get("ca")
        assert entry is not None and entry.value.startswith(b"TMCA1") and ca_key not in entry.value


async def test_standby_with_the_wrong_secret_cannot_unseal(nats_server: NatsServer) -> None:
    async with running_mesh(nats_server.url):
        pass  # the first leader generated and sealed the CA, then released the lease
    wrong = CaConfig(secret=b"not the operator secret!", trust_domain=TD, lease_ttl=1.0)
    async with connect(nats_server.url) as bus:
        with pytest.raises(SealError, match="wrong operator secret"):
            with trio.fail_after(10):
                await CaActor(wrong).run(ActorContext(bus=bus, replica="cp-wrong"))


async def test_operator_intermediate_from_files_signs_leaves(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    root = pki.generate_root(TD)
    inter = pki.generate_intermediate(root)
    config = CaConfig(
        secret=SECRET,
        trust_domain=TD,
        cert_pem=inter.chain_pem(),
        key_pem=inter.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
        bundle_pem=root.bundle.pem,
        lease_ttl=1.0,
    )
    async with connect(nats_server.url) as bus, trio.open_nursery() as nursery:
        ca = CaActor(config)
        await nursery.start(ca.run, ActorContext(bus=bus, replica="cp-op"))
        with trio.fail_after(10):
            await ca.leading.wait()
        assert ca.ca is not None and signing_root(ca.ca) == root.certificate
        ident = SpiffeId(TD, "shop", "checkout")
        token, _ = await create_token(bus, ident)
        agent = IdentityAgent(ident, token=token)
        await nursery.start(agent.run, bus)
        with trio.fail_after(10):
            await agent.wait_ready()
        assert agent.bundle == root.bundle  # peers trust the operator's root only
        assert len(agent.svid.issued.chain) == 2  # leaf + the intermediate
        pki.verify_svid(agent.svid.issued.chain, root.bundle, expected=ident)
        nursery.cancel_scope.cancel()


def test_config_from_env_and_the_embedded_secret(tmp_path: Path) -> None:
    with pytest.raises(CaConfigError, match="MESH_CA_SECRET or MESH_CA_SECRET_FILE"):
        CaConfig.from_env({})
    with pytest.raises(CaConfigError, match="is 5 bytes; at least 16"):
        CaConfig.from_env({"MESH_CA_SECRET": "short"})
    path, created = ensure_embedded_secret(tmp_path / "state")
    assert created and path.stat().st_mode & 0o777 == 0o600
    assert ensure_embedded_secret(tmp_path / "state") == (path, False)
    config = CaConfig.from_env({"MESH_CA_SECRET_FILE": str(path), "MESH_CA_LEAF_TTL": "90m"})
    assert config.secret == path.read_bytes().strip() and config.leaf_ttl.total_seconds() == 5400
    assert (
        "secret" not in repr(config).replace("secret=", "") or SECRET not in repr(config).encode()
    )
    with pytest.raises(CaConfigError, match="MESH_CA_CERT and MESH_CA_KEY must be given together"):
        CaConfig.from_env({"MESH_CA_SECRET": "x" * 16, "MESH_CA_CERT": "/nonexistent"})
    with pytest.raises(CaConfigError, match="MESH_CA_CERT /nonexistent: No such file"):
        CaConfig.from_env(
            {"MESH_CA_SECRET": "x" * 16, "MESH_CA_CERT": "/nonexistent", "MESH_CA_KEY": "/k"}
        )
    with pytest.raises(CaConfigError, match="'30s' is below the minimum leaf lifetime"):
        CaConfig.from_env({"MESH_CA_SECRET": "x" * 16, "MESH_CA_LEAF_TTL": "30s"})
    assert parse_duration("7d").days == 7
    with pytest.raises(CaConfigError, match="not a duration"):
        parse_duration("soon")
