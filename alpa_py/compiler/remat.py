"""Layer rematerialization (``remat_layer=True``): a stage's backward
recomputes the forward values it reads instead of keeping them.

Without it, a stage's forward program returns every forward value its
backward reads (the residuals: activations, masks, softmax outputs, ...),
and the pipeline keeps them for every micro-batch in flight between the
two programs. With it, as in Alpa, each layer is checkpointed: the forward
returns only the *inputs of its layers* (the values a later layer of the
stage reads, from an earlier one) besides what other stages, the update and
the step's outputs need, and the backward program runs, for each layer from
the last to the first, that layer's forward ops again (from the layer's
inputs, the stage's inputs and the parameters) and then the layer's
backward ops.

Granularity: the layer, not the stage. Keeping the stage's inputs only
would keep fewer bytes between the programs, but inside the backward every
layer's recomputed values would be live at once (the last layer's backward
runs first and needs all of them), which is the memory remat is meant to
save; per layer, a layer's recomputed values can die once its backward has
run. Within the backward program the op order is the one above; XLA's
scheduler may still move a recomputation earlier (no barrier is inserted).

The recomputed ops are the forward ops themselves (same op index, same
tensor ids) run in a second program, so XLA cannot merge them with the
forward's (common-subexpression elimination works within one program only),
and every pass that maps an op to its sharding (the joint intra-op plan) or
to its per-device form (``deferred_reduction``) works on them unchanged.
Their cost is charged to the stage's intra-op plan (``recompute_charges``).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import Op, OpGraph
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategies.registry import strategies_for
from alpa_py.compiler.surcharge import Surcharge


@dataclasses.dataclass(frozen=True)
class StageRemat:
  """How one stage's backward recomputes its forward.

  Attributes:
    residuals: forward values of the stage that its forward program hands
      to its backward: the inputs of its layers (read by an op of a later
      layer of the stage) that the backward needs.
    recompute: the forward ops the backward runs again, in program order.
    backward_order: the ops of the backward program in run order: per
      layer, last first, its recomputed ops, then its backward ops.
  """

  residuals: tuple[int, ...]
  recompute: tuple[int, ...]
  backward_order: tuple[int, ...]


def plan_stage_remat(graph: OpGraph, layer_of: Mapping[int, int],
                     fwd_ops: Sequence[Op], bwd_ops: Sequence[Op]) -> StageRemat:
  """Which forward values a stage keeps and which ops its backward reruns.

  Args:
    graph: the step's graph.
    layer_of: op index -> layer, for every pipeline op.
    fwd_ops, bwd_ops: the stage's forward and backward ops, in program
      order.

  Returns:
    The ``StageRemat``. A forward value produced in layer ``i`` and read
    by a stage op (forward or backward) of a layer ``j > i`` is a residual:
    the backward runs layer ``j`` before layer ``i``, so it cannot
    recompute it in time. Every other forward value of the stage that the
    backward reads is recomputed, with the stage's forward ops it depends on
    back to residuals, stage inputs and constants.
  """
  fwd_by_out = {t: op for op in fwd_ops for t in op.outputs}
  stage_ops = {op.index for op in list(fwd_ops) + list(bwd_ops)}
  residual = set()
  for op in fwd_ops:
    for t in op.outputs:
      if any(c in stage_ops and layer_of[c] > layer_of[op.index]
             for c in graph.consumers.get(t, ())):
        residual.add(t)
  recompute: set[int] = set()
  stack = [t for op in bwd_ops for t in op.inputs
           if isinstance(t, int) and t in fwd_by_out]
  kept = set()
  while stack:
    t = stack.pop()
    if t in residual:
      kept.add(t)
      continue
    op = fwd_by_out.get(t)
    if op is None or op.index in recompute:
      continue
    recompute.add(op.index)
    stack.extend(x for x in op.inputs if isinstance(x, int))
  layers = sorted({layer_of[i] for i in stage_ops}, reverse=True)
  order = []
  for l in layers:
    order += [op.index for op in fwd_ops
              if op.index in recompute and layer_of[op.index] == l]
    order += [op.index for op in bwd_ops if layer_of[op.index] == l]
  return StageRemat(
      residuals=tuple(t for op in fwd_ops for t in op.outputs if t in kept),
      recompute=tuple(op.index for op in fwd_ops if op.index in recompute),
      backward_order=tuple(order))


def recompute_charges(graph: OpGraph, ops: Sequence[Op], mesh: LogicalMesh,
                      option: AutoShardingOption) -> dict:
  """The recomputed ops' cost, as surcharges for ``run_auto_sharding``.

  A recomputed op runs a second time under the strategy the plan gives it,
  so each of its strategies costs its compute and communication once more:
  ``{(op index, strategy name): Surcharge((), that strategy's cost)}``
  (no collective kinds: the plan's collective prediction is not changed).
  """
  charges = {}
  for op in ops:
    for st in strategies_for(
        op, graph, mesh, prefer_reduce_scatter=option.prefer_reduce_scatter,
        allow_mixed_mesh_shape=option.allow_mixed_mesh_shape):
      charges[(op.index, st.name)] = Surcharge((), st.cost)
  return charges
