"""Input layout policies of the constrained methods (DataParallel, ZeRO).

A method fixes the layouts some step inputs may take: the batch split on
dim 0 over every mesh axis, parameters replicated or sharded, optimizer
state sharded. Optimizer state is found by name: a flat input whose path
holds one of the optax state names (``opt_state``, ``mu``, ``nu``, ...).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from alpa_py.compiler.strategies.spec import Spec, replicated
from alpa_py.methods import InputLayout
from alpa_py.driver.signature import Signature

_OPT_STATE_NAMES = {"opt_state", "mu", "nu", "momentum", "trace"}


def is_optimizer_state(path: str) -> bool:
  """Whether a flat input's path names optimizer state (``opt_state``, ...)."""
  return any(tok in _OPT_STATE_NAMES for tok in re.findall(r"[A-Za-z_]\w*", path))


def _largest_dim_spec(shape, axes, mesh_shape):
  n = math.prod(mesh_shape[a] for a in axes)
  for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[d] % n == 0 and n > 1:
      return tuple(axes if k == d else () for k in range(len(shape)))
  return replicated(len(shape))


def input_specs(layout: InputLayout, sig: Signature, mesh_shape,
                shapes: Sequence[tuple[int, ...]] | None = None
                ) -> dict[int, list[Spec]]:
  """The specs each flat input may take under a method's layout policy.

  Args:
    layout: the method's policy.
    sig: the call signature.
    mesh_shape: the logical mesh.
    shapes: the traced input shapes (one micro-batch), default the call's.

  Raises:
    ValueError: a batch input whose dim 0 the devices do not divide.
  """
  if layout is InputLayout.AUTO:
    return {}
  axes = tuple(a for a, s in enumerate(mesh_shape) if s > 1)
  n = math.prod(mesh_shape)
  specs = {}
  for i, (aval, owner, path) in enumerate(zip(sig.avals, sig.owners,
                                              sig.paths)):
    shape = aval.shape if shapes is None else shapes[i]
    r = len(shape)
    if r == 0:
      continue
    if owner in sig.batch:
      if shape[0] % n:
        raise ValueError(f"{path}: batch dim 0 (={shape[0]}) must be divisible "
                         f"by the number of devices (={n}) for data-parallel "
                         "methods")
      specs[i] = [(axes,) + ((),) * (r - 1)]
    elif layout is InputLayout.DATA_PARALLEL:
      specs[i] = [replicated(r)]
    elif layout is InputLayout.ZERO3 or is_optimizer_state(path):
      specs[i] = [_largest_dim_spec(shape, axes, mesh_shape)]
    else:
      specs[i] = [replicated(r)]
  return specs
