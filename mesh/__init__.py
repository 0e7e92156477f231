"""trio-mesh core: resource model, identities, wire messages and the CLI."""

__version__ = "0.1.0"
