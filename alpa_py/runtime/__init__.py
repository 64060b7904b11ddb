"""Runtimes that execute plans."""
