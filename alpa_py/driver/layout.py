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

from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategies.spec import Spec, replicated
from alpa_py.compiler.strategy_constraints import data_axes
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


def check_batch_divisible(sig: Signature, shapes, mesh_shape,
                          option: AutoShardingOption) -> None:
  """Raises if a batch input's dim 0 does not divide over the data axes."""
  axes = data_axes(tuple(mesh_shape), option)
  n = math.prod(mesh_shape[a] for a in axes)
  for i in sorted(sig.batch_inputs):
    shape = shapes[i]
    if shape and shape[0] % n:
      raise ValueError(
          f"{sig.paths[i]}: batch dim 0 (={shape[0]}) must be divisible by the "
          f"data axis (mesh axes {list(axes)} of mesh {tuple(mesh_shape)}, "
          f"={n} devices); change the batch size or the mesh")


def _zero3_spec(aval, shape, axes, mesh_shape, threshold):
  nbytes = math.prod(shape) * aval.dtype.itemsize
  if nbytes < threshold:
    return replicated(len(shape))
  return _largest_dim_spec(shape, axes, mesh_shape)


def _tensor_parallel_specs(sig: Signature, mesh_shape, shapes):
  """Batch inputs split on axis 0; every other array of rank >= 1 split on
  the last axis along any dim it divides (the ILP chooses which: Megatron's
  column / row alternation is the cheapest choice for an MLP), or
  replicated if it divides none; vectors may also stay replicated."""
  if len(mesh_shape) < 2 or mesh_shape[0] < 2 or mesh_shape[-1] < 2:
    raise ValueError(f"a tensor-parallel layout needs a 2-D mesh with both "
                     f"axes > 1; got {tuple(mesh_shape)}")
  last = len(mesh_shape) - 1
  specs = {}
  for i, (aval, owner) in enumerate(zip(sig.avals, sig.owners)):
    shape = aval.shape if shapes is None else shapes[i]
    r = len(shape)
    if r == 0:
      continue
    if owner in sig.batch:
      if shape[0] % mesh_shape[0]:
        raise ValueError(f"{sig.paths[i]}: batch dim 0 (={shape[0]}) must be "
                         f"divisible by mesh axis 0 (={mesh_shape[0]})")
      specs[i] = [((0,),) + ((),) * (r - 1)]
      continue
    split = [tuple((last,) if k == d else () for k in range(r))
             for d in range(r) if shape[d] % mesh_shape[last] == 0]
    if r == 1 or not split:
      split.append(replicated(r))
    specs[i] = split
  return specs


def input_specs(layout: InputLayout, sig: Signature, mesh_shape,
                shapes: Sequence[tuple[int, ...]] | None = None,
                option: AutoShardingOption | None = None
                ) -> dict[int, list[Spec]]:
  """The specs each flat input may take under a method's layout policy.

  Args:
    layout: the method's policy.
    sig: the call signature.
    mesh_shape: the logical mesh.
    shapes: the traced input shapes (one micro-batch), default the call's.
    option: the pass options (ZeRO-3's all-gather threshold).

  Raises:
    ValueError: a batch input whose dim 0 the devices do not divide.
  """
  if layout is InputLayout.AUTO:
    return {}
  if layout is InputLayout.TENSOR_PARALLEL:
    return _tensor_parallel_specs(sig, mesh_shape, shapes)
  axes = tuple(a for a, s in enumerate(mesh_shape) if s > 1)
  n = math.prod(mesh_shape)
  threshold = option.force_zero_stage_3_all_gather_threshold if option else 0
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
    elif layout is InputLayout.ZERO3:
      specs[i] = [_zero3_spec(aval, shape, axes, mesh_shape, threshold)]
    elif is_optimizer_state(path):
      specs[i] = [_largest_dim_spec(shape, axes, mesh_shape)]
    else:
      specs[i] = [replicated(r)]
  return specs


# an input is among the heaviest when it holds at least this share of the
# largest non-batch input's bytes
HEAVY_SHARE = 0.5


def _heavy_inputs(graph, sig: Signature) -> tuple[list[int], list[int]]:
  """(heavy, light) flat positions of the non-batch inputs of rank >= 1:
  heavy ones hold at least ``HEAVY_SHARE`` of the largest one's bytes."""
  params = [i for i, t in enumerate(graph.invars)
            if i not in sig.batch_inputs and graph.tensor(t).shape]
  if not params:
    return [], []

  def nbytes(i):
    return graph.tensor(graph.invars[i]).nbytes

  top = max(map(nbytes, params))
  heavy = [i for i in params if nbytes(i) >= HEAVY_SHARE * top]
  return heavy, [i for i in params if nbytes(i) < HEAVY_SHARE * top]


def runner_up_exclusions(graph, sig: Signature, solution) -> dict[int, Spec]:
  """Graph input tensor -> the layout ``solution`` gave it, for the
  heaviest non-batch inputs (at least ``HEAVY_SHARE`` of the largest one's
  bytes): the ILP solved again without those layouts gives the next-best
  plan for the arrays that dominate the step's traffic. Its op-by-op prices
  may rank two layouts of an array within a few percent where the compiled
  programs differ by far more (an MoE's experts split by expert, against
  split by their FFN width inside every expert)."""
  heavy, _ = _heavy_inputs(graph, sig)
  spec_of = solution.spec_of
  return {graph.invars[i]: spec_of[graph.invars[i]] for i in heavy
          if graph.invars[i] in spec_of}


def light_replicated(graph, sig: Signature) -> dict[int, list[Spec]]:
  """Flat input -> [replicated] for the non-batch inputs below the
  heaviest (``_heavy_inputs``): kept whole on every device, as DeepSpeed
  keeps small parameters whole rather than gathering each one every step."""
  _, light = _heavy_inputs(graph, sig)
  return {i: [replicated(len(graph.tensor(graph.invars[i]).shape))]
          for i in light}
