"""Errors a user can cause. Each carries a message meant for that user.

The CLI prints these as one line and exits non-zero; anything else is a bug and
shows a traceback.
"""


class MeshError(Exception):
    """Base of every error whose message is written for the user."""


class ConfigError(MeshError):
    """A file, flag or resource is invalid. The message names what and where."""


class BusError(MeshError):
    """NATS could not be reached, or refused an operation."""
