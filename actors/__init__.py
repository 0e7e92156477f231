"""Control-plane actors: long-lived trio services that talk over the bus."""
