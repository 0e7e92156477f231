"""Where CLI commands take their NATS credentials from (mesh/cli/common.py: use_creds)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bus.auth import CREDS_ENV, ensure_credentials, mesh_users
from mesh.cli.common import default_admin_creds, use_creds


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ensure_credentials(tmp_path, mesh_users())
    monkeypatch.setenv("MESH_STATE_DIR", str(tmp_path))
    # setenv first so that monkeypatch removes what use_creds() sets, after the test.
    monkeypatch.setenv(CREDS_ENV, "")
    monkeypatch.delenv(CREDS_ENV)
    return tmp_path


def args(command: str, nats: str, creds: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(command=command, nats=nats, creds=creds)


def test_local_admin_file_only_for_loopback_urls(state: Path) -> None:
    admin = state / "nats-creds" / "admin.json"
    assert default_admin_creds("nats://127.0.0.1:4222,nats://localhost:4223") == admin
    # A local mesh's password is never offered to a server elsewhere.
    assert default_admin_creds("nats://127.0.0.1:4222,nats://10.0.0.12:4222") is None
    assert default_admin_creds("nats://nats.example.org:4222") is None


def test_precedence_flag_then_env_then_local_admin(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    use_creds(args("ping", "nats://127.0.0.1:4222"))
    assert os.environ[CREDS_ENV] == str((state / "nats-creds" / "admin.json").resolve())
    monkeypatch.setenv(CREDS_ENV, "/etc/trio-mesh/nats-creds/admin.json")
    use_creds(args("ping", "nats://127.0.0.1:4222"))
    assert os.environ[CREDS_ENV] == "/etc/trio-mesh/nats-creds/admin.json"
    use_creds(args("ping", "nats://127.0.0.1:4222", creds=str(state / "x.json")))
    assert os.environ[CREDS_ENV] == str((state / "x.json").resolve())


def test_replicas_and_sidecars_default_to_their_own_role(state: Path) -> None:
    import os

    for command, role in (("controlplane", "controlplane"), ("sidecar", "sidecar")):
        use_creds(args(command, "nats://127.0.0.1:4222"))
        assert os.environ.pop(CREDS_ENV) == str((state / "nats-creds" / f"{role}.json").resolve())
    use_creds(args("sidecar", "nats://10.0.0.12:4222"))
    assert CREDS_ENV not in os.environ
