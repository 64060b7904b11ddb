"""Sharding strategies: specs, loop nests, per-primitive rules."""
