"""Which dimension of each tensor is the batch dimension.

Seeded with the batch inputs' dim 0, the batch dimension flows forward
through every op along its loop nest: an operand's batch dim names one loop
dim of the op, and every output dim that follows that loop dim is a batch
dim too. Activations, their gradients and the per-example losses carry it;
a weight gradient does not (the op contracts the batch loop away, and that
loop's split is what makes the gradient a partial sum to reduce).

The constrained methods (DataParallel, ZeRO) and
``AutoShardingOption.force_batch_dim_to_mesh_dim`` use it to keep every
op's batch dim on the data axes, as Alpa does.
"""

from __future__ import annotations

import collections
from typing import Mapping

from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.strategies.registry import loop_nest_for


def infer_batch_dims(graph: OpGraph, seeds: Mapping[int, int]) -> dict[int, int]:
  """Tensor id -> its batch dim, for every tensor that has one.

  The batch dim flows into a scan's body (a stacked operand's slice loses
  the stacked dim) and back out of it (a stacked result gains it).

  Args:
    graph: the step's graph.
    seeds: tensor id -> batch dim of the batch inputs (usually dim 0).
  """
  dims = {t: d for t, d in seeds.items() if graph.tensor(t).shape}
  _flow(graph, graph.ops, dims)
  return dims


def _flow(graph: OpGraph, ops, dims: dict[int, int]) -> None:
  for op in ops:
    region = graph.regions.get(op.index)
    if region is not None:
      _flow_region(graph, op, region, dims)
      continue
    if op.index in graph.branches:
      _flow_branches(graph, op, graph.branches[op.index], dims)
      continue
    carried = [(pos, t) for pos, t in enumerate(op.inputs)
               if not isinstance(t, Literal) and t in dims]
    if not carried:
      continue
    nest = loop_nest_for(op, graph)
    votes = collections.Counter()
    for pos, t in carried:
      dim_map = nest.in_maps[pos] if pos < len(nest.in_maps) else None
      if dim_map is not None and dims[t] < len(dim_map) and \
          dim_map[dims[t]] is not None:
        votes[dim_map[dims[t]]] += 1
    if not votes:
      continue
    loop = votes.most_common(1)[0][0]
    if not nest.shardable[loop]:
      continue
    for out, dim_map in zip(op.outputs, nest.out_maps):
      for d, l in enumerate(dim_map):
        if l == loop:
          dims[out] = d
          break


def _flow_region(graph: OpGraph, op, region, dims: dict[int, int]) -> None:
  stacked_from = len(region.consts_in) + len(region.carry_in)
  for pos, (ref, t) in enumerate(zip(op.inputs, region.invars)):
    if isinstance(ref, Literal) or ref not in dims:
      continue
    d = dims[ref] - (pos >= stacked_from)
    if d >= 0:
      dims[t] = d
  _flow(graph, region.ops, dims)
  nk = len(region.carry_in)
  for j, (out, ref) in enumerate(zip(op.outputs, region.outvars)):
    if isinstance(ref, int) and ref in dims:
      dims[out] = dims[ref] + (j >= nk)


def _flow_branches(graph: OpGraph, op, branches, dims: dict[int, int]) -> None:
  """A cond's result keeps a batch dim where every branch gives it one."""
  for branch in branches:
    for ref, t in zip(op.inputs[1:], branch.invars):
      if not isinstance(ref, Literal) and ref in dims:
        dims[t] = dims[ref]
    _flow(graph, branch.ops, dims)
  for j, out in enumerate(op.outputs):
    got = {dims.get(b.outvars[j]) for b in branches}
    if len(got) == 1 and None not in got:
      dims[out] = got.pop()


def batch_seeds(graph: OpGraph, batch_inputs) -> dict[int, int]:
  """Dim 0 of the graph inputs at the flat positions ``batch_inputs``."""
  return {graph.invars[i]: 0 for i in sorted(batch_inputs)
          if graph.tensor(graph.invars[i]).shape}
