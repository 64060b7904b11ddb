"""Backend choice shared by the kernel families: Pallas on GPU, the jnp
reference elsewhere (interpreted Pallas is a correctness tool, not a fast
path)."""

import jax


def default_interpret() -> bool:
  return jax.default_backend() != "gpu"


def resolve(backend: str, backends, *, auto_on_gpu: str = "pallas") -> str:
  """Validates ``backend`` against ``backends`` and resolves ``auto``:
  ``auto_on_gpu`` on GPU, the reference elsewhere."""
  if backend not in backends:
    raise ValueError(f"backend (={backend!r}) must be one of {backends}")
  if backend == "auto":
    return auto_on_gpu if jax.default_backend() == "gpu" else "reference"
  return backend
