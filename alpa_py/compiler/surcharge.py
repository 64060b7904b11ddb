"""Charging an op for the collectives XLA added that its plan did not price.

After a compile, every collective in the optimized HLO names the graph op it
was inserted for (``graph_eval.evaluate``'s ``op<index>`` name scopes). One that
the plan did not predict at that op becomes a ``Surcharge`` on the op's
chosen strategy: its time is added to that strategy's cost in the next
solve, and, if the strategy is chosen again, the collective is part of the
plan's prediction. The driver re-plans a few times at most.
"""

from __future__ import annotations

import collections
import dataclasses

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.strategies.spec import FORBIDDEN_PENALTY


@dataclasses.dataclass(frozen=True)
class Surcharge:
  """Collectives XLA adds for one op under one strategy, and their price."""

  kinds: tuple[str, ...]
  seconds: float


def _price(kind: str, nbytes: float, mesh: LogicalMesh,
           forbidden: frozenset) -> float:
  axes = [a for a, s in enumerate(mesh.shape) if s > 1]
  if kind in forbidden:  # an option forbids it: priced as the plan prices it
    return FORBIDDEN_PENALTY
  if kind == "all-reduce":
    return sum(mesh.all_reduce(nbytes, a) for a in axes)
  if kind == "all-to-all":
    return sum(mesh.all_to_all(nbytes, a) for a in axes)
  return sum(mesh.all_gather(nbytes, a) for a in axes)


def _adjacent(ops, a: int, b: int) -> bool:
  """Whether one of the two ops reads an output of the other."""
  if a not in ops or b not in ops:
    return False
  def tensors(refs):
    return {t for t in refs if not isinstance(t, Literal)}

  oa, ob = ops[a], ops[b]
  return bool(set(oa.outputs) & tensors(ob.inputs)) or \
      bool(set(ob.outputs) & tensors(oa.inputs))


def new_surcharges(graph: OpGraph, solution, events, compiled,
                   mesh: LogicalMesh, known,
                   forbidden: frozenset = frozenset()) -> dict:
  """Surcharges for collectives in ``compiled`` (``hlo_stats.collectives``)
  at an op beyond what ``events`` (``collectives.plan_events`` with the
  ``known`` surcharges) put there.

  Priced as the collective over every mesh axis on the op's largest operand
  or output (an upper bound of what resharding it can move). ``known``
  surcharges are kept and not charged twice. A kind in ``forbidden``
  (``allow_all_gather=False``, ...) costs what a forbidden resharding costs
  in the plan.
  """
  predicted = collections.Counter((e.op, e.kind) for e in events)
  seen = collections.Counter((c.graph_op, k) for c in compiled
                             if c.graph_op is not None for k in c.kinds)
  ops = {op.index: op for op in graph.all_ops()}
  out = dict(known)
  added = collections.defaultdict(list)
  for kind in {k for _, k in seen}:
    extra = [o for (o, k), n in seen.items() if k == kind and o in ops
             for _ in range(n - predicted[(o, kind)])]
    missing = [o for (o, k), n in predicted.items() if k == kind
               for _ in range(n - seen[(o, kind)])]
    for o in extra:
      # XLA often places a resharding one op earlier or later than the plan
      # (gathering an update before the op that applies it): a missing
      # collective of the same kind next door explains it
      near = next((m for m in missing if _adjacent(ops, o, m)), None)
      if near is not None:
        missing.remove(near)
      else:
        added[o].append(kind)
  for op_idx, kinds in added.items():
    name = solution.strategy_of.get(op_idx)
    if name is None:
      continue
    op = ops[op_idx]
    nbytes = max(graph.tensor(t).nbytes for t in op.inputs + op.outputs
                 if not isinstance(t, Literal))
    old = out.get((op_idx, name))
    kinds = tuple(sorted((old.kinds if old else ()) + tuple(kinds)))
    out[(op_idx, name)] = Surcharge(
        kinds, sum(_price(k, nbytes, mesh, forbidden) for k in kinds))
  return out
