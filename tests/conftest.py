"""Test setup: 8 simulated CPU devices, set before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALPA_PY_QUIET", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import jax  # noqa: E402

if os.environ["JAX_PLATFORMS"] == "cpu":
  # (a GPU run, JAX_PLATFORMS=cuda, is for the kernel tests only)
  assert jax.device_count() == 8, (
      "tests need 8 simulated devices; JAX was imported before conftest set "
      f"XLA_FLAGS (devices: {jax.devices()})")
