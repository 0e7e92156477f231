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


class IdentityError(MeshError):
    """A certificate, CSR, join token or sealed key was refused.

    The concrete classes live in ``mesh.pki_errors``; each carries a short ``reason`` flag
    (for logs and metrics) besides its message.
    """
