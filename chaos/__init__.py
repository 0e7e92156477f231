"""Game days: fault injection, killing and pausing parts of the mesh, steady-state checks."""
