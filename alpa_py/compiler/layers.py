"""Operator clustering into layers (Alpa's layer construction).

The forward pass is the ops before the cotangent seed that ``alpa_py.grad`` /
``value_and_grad`` leave in the program; everything after it is the backward
pass. Forward ops get layers either from ``mark_pipeline_boundary`` calls
(``ManualLayerOption``) or from a dynamic program (``AutoLayerOption``):
contiguous groups whose FLOPs stay within ``(1 + eps)`` of the mean, with the
largest bytes crossing any boundary minimised. A backward op joins the
lowest layer among the backward values it reads, or the latest home among
the forward values it reads if that is lower (a forward value's home is the
last layer reading it in the forward pass). A backward op that reads
neither (only step inputs and constants: a parameter-only op, such as the
forward recomputed under ``jax.checkpoint``) joins the highest layer among
its readers (see ``_place_input_only_ops``). Every backward dependency then
points from a later layer to an earlier one, as the schedules require.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Sequence

from alpa_py.compiler.graph import Op, OpGraph
from alpa_py.compiler.markers import (PIPELINE_BOUNDARY, PIPELINE_ITERATION,
                                     PIPELINE_SEED)
from alpa_py.compiler.strategies.registry import is_heavy



@dataclasses.dataclass(frozen=True)
class ManualLayerOption:
  """Layers from ``alpa_py.mark_pipeline_boundary()`` calls.

  Attributes:
    remat_layer: recompute each layer's forward in the backward pass, keeping
      only the layers' inputs between a stage's forward and backward
      (``compiler/remat.py``).
  """

  remat_layer: bool = False

  def __post_init__(self):
    if not isinstance(self.remat_layer, bool):
      raise TypeError(f"remat_layer (={self.remat_layer!r}) must be a bool")


@dataclasses.dataclass(frozen=True)
class AutoLayerOption:
  """Layers found by the clustering DP.

  Attributes:
    layer_num: number of layers to form.
    remat_layer: recompute each layer's forward in the backward pass, keeping
      only the layers' inputs between a stage's forward and backward
      (``compiler/remat.py``).
    eps: allowed FLOPs imbalance: each layer <= (1 + eps) x the mean.
  """

  layer_num: int
  remat_layer: bool = False
  eps: float = 0.5

  def __post_init__(self):
    if not isinstance(self.layer_num, int) or self.layer_num < 1:
      raise ValueError(f"layer_num (={self.layer_num!r}) must be a positive int")
    if self.eps < 0:
      raise ValueError(f"eps (={self.eps}) must be >= 0")
    if not isinstance(self.remat_layer, bool):
      raise TypeError(f"remat_layer (={self.remat_layer!r}) must be a bool")


@dataclasses.dataclass(frozen=True)
class LayerAssignment:
  """Layer of every pipeline op, and which ops are forward.

  ``remat`` (the option's ``remat_layer``): each stage's backward recomputes
  its layers' forward ops instead of reading them from its forward.
  """

  num_layers: int
  layer_of: dict  # op index -> layer
  forward: frozenset  # op indices of the forward pass
  layer_flops: tuple[float, ...]
  remat: bool = False


def seed_position(graph: OpGraph) -> int:
  """Position of the backward pass's start (the loss's cotangent seed)."""
  seeds = [pos for pos, kind, _ in graph.pipeline_marks
           if kind == PIPELINE_SEED]
  if not seeds:
    raise ValueError(
        "PipeshardParallel needs the gradient computed with alpa_py.grad or "
        "alpa_py.value_and_grad (drop-in for jax.grad / jax.value_and_grad), "
        "which marks where the backward pass starts")
  if len(seeds) > 1:
    raise ValueError(f"found {len(seeds)} alpa_py.grad / value_and_grad calls "
                     "in the step; a pipelined step takes exactly one")
  return seeds[0]


def cluster_layers(flops: Sequence[float], cut_bytes: Sequence[float],
                   num_layers: int, eps: float) -> list[int]:
  """Splits atoms 0..n-1 into contiguous layers (the clustering DP).

  Args:
    flops: work of each atom.
    cut_bytes: cut_bytes[i]: bytes crossing a boundary placed after atom i.
    num_layers: layers to form.
    eps: each layer's FLOPs <= (1 + eps) * total / num_layers.

  Returns:
    The start atom of each layer (first is 0).

  Raises:
    ValueError: no split meets the balance constraint.
  """
  n = len(flops)
  if num_layers > n:
    raise ValueError(f"layer_num (={num_layers}) exceeds the number of "
                     f"forward compute blocks (={n}) in the step")
  prefix = [0.0]
  for f in flops:
    prefix.append(prefix[-1] + f)
  limit = (1 + eps) * prefix[-1] / num_layers * (1 + 1e-9)
  inf = math.inf
  # best[l][j]: (max cut, -min layer flops slack) for atoms [0, j) in l layers
  best = [[inf] * (n + 1) for _ in range(num_layers + 1)]
  arg = [[-1] * (n + 1) for _ in range(num_layers + 1)]
  best[0][0] = 0.0
  for l in range(1, num_layers + 1):
    for j in range(l, n + 1):
      for i in range(l - 1, j):
        if best[l - 1][i] == inf or prefix[j] - prefix[i] > limit:
          continue
        val = best[l - 1][i] if i == 0 else max(best[l - 1][i], cut_bytes[i - 1])
        if val < best[l][j]:
          best[l][j], arg[l][j] = val, i
  if best[num_layers][n] == inf:
    raise ValueError(
        f"no split of the forward pass into {num_layers} layers keeps each "
        f"within (1 + eps) = {1 + eps:g} x the mean FLOPs; raise eps or use "
        "fewer layers")
  starts, j = [], n
  for l in range(num_layers, 0, -1):
    i = arg[l][j]
    starts.append(i)
    j = i
  return starts[::-1]


def _atoms(fwd_ops: list[Op], cuts: Sequence[int] = ()) -> list[list[Op]]:
  """Contiguous groups of forward ops the clustering cuts between: one
  heavy op each, or (with ``cuts``, op positions) the segments between
  cuts."""
  atoms: list[list[Op]] = []
  cuts = sorted(cuts)
  k = 0
  for op in fwd_ops:
    if cuts:
      new = k < len(cuts) and op.index >= cuts[k]
      while k < len(cuts) and op.index >= cuts[k]:
        k += 1
    else:
      new = is_heavy(op.name) and bool(atoms) and any(
          is_heavy(o.name) for o in atoms[-1])
    if not atoms or new:
      atoms.append([op])
    else:
      atoms[-1].append(op)
  return atoms


def _auto_forward_layers(graph: OpGraph, fwd_ops: list[Op],
                         option: AutoLayerOption) -> dict[int, int]:
  # the iterations of an unrolled scan over layers are the units to group,
  # where there are enough of them
  seed = fwd_ops[-1].index + 1 if fwd_ops else 0
  cuts = [pos for pos, kind, _ in graph.pipeline_marks
          if kind == PIPELINE_ITERATION and pos < seed]
  atoms = _atoms(fwd_ops, cuts if len(cuts) + 1 >= option.layer_num else ())
  atom_of = {op.index: a for a, ops in enumerate(atoms) for op in ops}
  n = len(atoms)
  diff = [0.0] * (n + 1)
  for a, ops in enumerate(atoms):
    for op in ops:
      for t in op.outputs:
        last = max((atom_of[c] for c in graph.consumers.get(t, ())
                    if c in atom_of), default=a)
        if last > a:
          nbytes = graph.tensor(t).nbytes
          diff[a] += nbytes
          diff[last] -= nbytes
  cut, acc = [], 0.0
  for a in range(n):
    acc += diff[a]
    cut.append(acc)
  flops = [sum(op.flops for op in ops) for ops in atoms]
  starts = cluster_layers(flops, cut, option.layer_num, option.eps)
  return {op.index: bisect.bisect_right(starts, atom_of[op.index]) - 1
          for op in fwd_ops}


def _place_input_only_ops(graph: OpGraph, ops: Sequence[Op],
                          layer_of: dict[int, int],
                          num_layers: int) -> dict[int, int]:
  """Layers of the backward ops that read only step inputs and constants.

  Such an op (a ``select_n`` on a parameter in the forward that a
  ``jax.checkpoint``-ed block recomputes in the backward, a zero fill) has
  no input that ties it to a layer, but its readers do, and it must run
  before every one of them, for every micro-batch. A micro-batch's backward
  runs from the last stage to the first, so the first of its readers to
  run is the one in the highest layer: the op joins that layer, and the
  stages of lower-layer readers receive its value like any other backward
  value. (Joining the lowest reader's layer, as ordinary backward values do,
  would run it after a higher-layer reader had needed it.) An op read only
  outside the pipeline (by the update) joins the last layer.

  Args:
    graph: the step's graph.
    ops: the ops to place, in program order.
    layer_of: the layers of every other pipeline op.
    num_layers: number of layers.

  Returns:
    Op index -> layer, for ``ops``.
  """
  placed: dict[int, int] = {}
  # last op first: a chain of such ops climbs to its highest reader's layer
  for op in reversed(ops):
    readers = [placed[c] if c in placed else layer_of[c]
               for t in op.outputs for c in graph.consumers.get(t, ())
               if c in placed or c in layer_of]
    placed[op.index] = max(readers) if readers else num_layers - 1
  return placed


def assign_layers(graph: OpGraph, ops: Sequence[Op],
                  option) -> LayerAssignment:
  """Gives every op of the pipelined part of the step a layer.

  Raises:
    ValueError: missing grad marker, missing or empty manual layers.
  """
  seed = seed_position(graph)
  fwd_ops = [op for op in ops if op.index < seed]
  bwd_ops = [op for op in ops if op.index >= seed]
  if isinstance(option, AutoLayerOption):
    layer_of = _auto_forward_layers(graph, fwd_ops, option)
    num_layers = option.layer_num
  else:
    bounds = sorted(pos for pos, kind, _ in graph.pipeline_marks
                    if kind in (PIPELINE_BOUNDARY, PIPELINE_ITERATION)
                    and pos < seed)
    if not bounds:
      raise ValueError(
          "ManualLayerOption found no layer boundary in the forward pass: call "
          "alpa_py.mark_pipeline_boundary() between layers, or use "
          "AutoLayerOption(layer_num=...)")
    num_layers = len(bounds) + 1
    layer_of = {op.index: bisect.bisect_right(bounds, op.index) for op in fwd_ops}
    counts = [0] * num_layers
    for op in fwd_ops:
      counts[layer_of[op.index]] += 1
    empty = [l for l, c in enumerate(counts) if c == 0]
    if empty:
      raise ValueError(
          f"pipeline boundary markers are unbalanced: layer(s) {empty} of "
          f"{num_layers} contain no operation (two markers with nothing "
          "between them, or a marker at the very start/end of the forward)")
  # A forward tensor's home is the last layer that reads it in the forward
  # pass (a boundary tensor belongs to the layer after the boundary).
  home = {}
  for op in fwd_ops:
    for t in op.outputs:
      readers = [layer_of[c] for c in graph.consumers.get(t, ())
                 if c in layer_of]
      home[t] = max(readers, default=layer_of[op.index])
  bwd_tensor_layer: dict[int, int] = {}
  pending = []
  for op in bwd_ops:
    ins = [t for t in op.inputs if isinstance(t, int)]
    back = [bwd_tensor_layer[t] for t in ins if t in bwd_tensor_layer]
    fwd = [home[t] for t in ins if t in home]
    if back or fwd:
      # <= every backward input's layer (backward data flows to earlier
      # layers); as late as the forward values it reads allow
      layer = min(min(back), max(fwd)) if back and fwd else (
          min(back) if back else max(fwd))
      layer_of[op.index] = layer
      for t in op.outputs:
        bwd_tensor_layer[t] = layer
    else:
      pending.append(op)
  layer_of.update(_place_input_only_ops(graph, pending, layer_of, num_layers))
  flops = [0.0] * num_layers
  for op in ops:
    flops[layer_of[op.index]] += op.flops
  return LayerAssignment(num_layers, layer_of,
                         frozenset(op.index for op in fwd_ops), tuple(flops),
                         remat=option.remat_layer)
