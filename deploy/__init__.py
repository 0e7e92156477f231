"""Topologies, the demo application, and running the mesh on real hosts."""
