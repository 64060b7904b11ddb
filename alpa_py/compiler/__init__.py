"""Compiler passes: jaxpr -> plan. No device is touched except to compile."""
