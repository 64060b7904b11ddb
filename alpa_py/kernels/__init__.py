"""Pallas kernels with pure-jnp references (imports nothing from compiler/runtime)."""
