"""Shared fixtures. Tests run real nats-server processes, real sockets and real TLS."""
