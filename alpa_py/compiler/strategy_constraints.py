"""What an option removes from an op's strategies before the ILP sees them.

* The batch rule (``force_batch_dim_to_mesh_dim``; ``force_data_parallel``
  and the constrained methods): every operand and output that carries the
  batch dim keeps it split over the data axes. Forward ops then run on their
  slice of the batch, and an op that contracts the batch loop (a weight
  gradient) produces a partial sum over the data axes: the gradient
  all-reduce (or reduce-scatter) of data parallelism, decided inside the
  op's strategy rather than by gathering the batch.
* The heavy-op rule (``allow_recompute_heavy_op=False``, as in Alpa): a dot
  or convolution takes one of its strategies that divide its work over the
  most devices, so that no device recomputes what another computes.

An op for which the batch rule leaves no strategy (its batch loop cannot be
split, e.g. a sort along the batch) keeps all of them; a heavy op that no
strategy splits at all is an error that names it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.errors import InfeasiblePlanError
from alpa_py.compiler.graph import Literal, Op, OpGraph
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategies.loop_nest import Strategy
from alpa_py.compiler.strategies.registry import is_heavy


def data_axes(mesh_shape: tuple[int, ...],
              option: AutoShardingOption) -> tuple[int, ...]:
  """The mesh axes the batch dim must stay on (empty: no batch rule)."""
  k = option.force_batch_dim_to_mesh_dim
  if k is not None:
    if k >= len(mesh_shape):
      raise ValueError(f"force_batch_dim_to_mesh_dim (={k}) names no axis of "
                       f"the mesh {mesh_shape}")
    return (k,) if mesh_shape[k] > 1 else ()
  if option.force_data_parallel:
    return tuple(a for a, s in enumerate(mesh_shape) if s > 1)
  return ()


class StrategyConstraints:
  """``constrain(op, strategies) -> strategies`` under the options."""

  def __init__(self, graph: OpGraph, mesh: LogicalMesh,
               option: AutoShardingOption, batch_dims: Mapping[int, int]):
    self._graph = graph
    self._mesh = mesh
    self._axes = frozenset(data_axes(mesh.shape, option))
    self._batch_dims = batch_dims if self._axes else {}
    self._heavy_rule = (not option.allow_recompute_heavy_op
                        and mesh.num_devices > 1)

  def _keeps_batch(self, op: Op, s: Strategy) -> bool:
    for ref, spec in zip(op.inputs, s.in_specs):
      if spec is not None and not isinstance(ref, Literal):
        d = self._batch_dims.get(ref)
        if d is not None and not self._axes <= set(spec[d]):
          return False
    for ref, spec in zip(op.outputs, s.out_specs):
      d = self._batch_dims.get(ref)
      if d is not None and not self._axes <= set(spec[d]):
        return False
    return True

  def tensor(self, t: int, strats: Sequence[Strategy]) -> list[Strategy]:
    """A step input's layouts under the batch rule: a batch input arrives
    split over the data axes (not whole on every device, to be sliced)."""
    d = self._batch_dims.get(t)
    if d is None:
      return list(strats)
    return [s for s in strats if self._axes <= set(s.out_specs[0][d])] or \
        list(strats)

  def __call__(self, op: Op, strats: Sequence[Strategy]) -> list[Strategy]:
    strats = list(strats)
    if self._batch_dims and any(
        not isinstance(t, Literal) and t in self._batch_dims
        for t in op.inputs + op.outputs):
      kept = [s for s in strats if self._keeps_batch(op, s)]
      strats = kept or strats
    if self._heavy_rule and is_heavy(op.name):
      least = min(s.compute_cost for s in strats)
      # the one strategy that splits no loop does all the work on each device
      whole = [s.compute_cost for s in strats if s.name == "replicated"]
      if whole and whole[0] > 0 and least >= whole[0] * (1 - 1e-9):
        shapes = " x ".join(
            f"{self._graph.tensor(t).dtype}{list(self._graph.tensor(t).shape)}"
            for t in op.inputs if not isinstance(t, Literal))
        raise InfeasiblePlanError(
            f"{op.name} #{op.index} ({shapes}) cannot be split over the mesh "
            f"{self._mesh.shape}: no strategy divides its work, and "
            "allow_recompute_heavy_op=False forbids running it whole on every "
            "device. Pass AutoShardingOption(allow_recompute_heavy_op=True), "
            "or choose a mesh_shape whose axes divide its dimensions.")
      strats = [s for s in strats if s.compute_cost <= least * (1 + 1e-9)]
    return strats
