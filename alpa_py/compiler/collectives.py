"""The collectives a sharding plan promises, counted as XLA will run them.

A plan's collectives come from two places: an op's strategy (a partial sum
all-reduced, ``+AR``, or reduce-scattered, ``+RS``) and a resharding between
a producer's layout and the layout a consumer asks for (all-gather,
all-to-all). XLA's combiners then merge collectives of one kind that do not
depend on each other, so the count that runs is, per combined kind, the
longest chain of collectives of that kind where each depends on the one
before; kinds the platform does not combine count one by one.
"""

from __future__ import annotations

import dataclasses

from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.hlo_stats import KINDS
from alpa_py.compiler.strategies.spec import replicated, resharding_kinds

# Kinds XLA's combiners merge, per platform: each family is one HLO op kind
# whose independent instances merge (on CPU a reduce-scatter is an
# all-reduce + dynamic-slice, so the two are one family there).
COMBINED = {
    "cpu": (frozenset({"all-reduce", "reduce-scatter"}),),
    "gpu": (frozenset({"all-reduce"}), frozenset({"reduce-scatter"}),
            frozenset({"all-gather"})),
    "cuda": (frozenset({"all-reduce"}), frozenset({"reduce-scatter"}),
             frozenset({"all-gather"})),
}


class PlanMismatchWarning(UserWarning):
  """The compiled step's collectives are not the ones its plan promised."""


@dataclasses.dataclass(frozen=True)
class CollectiveEvent:
  """One collective the plan implies, and the op it belongs to."""

  kind: str
  op: int  # op index
  operand: int | None  # operand position for a resharding; None: the output


def strategy_kinds(name: str) -> set[str]:
  """Collectives named by a strategy (``k0:S0+AR``, ``k0:S01+RS0+AR1``)."""
  kinds = set()
  if "+AR" in name:
    kinds.add("all-reduce")
  if "+RS" in name:
    kinds.add("reduce-scatter")
  return kinds


def plan_events(graph: OpGraph, solution, surcharges=None,
                aliases=()) -> list[CollectiveEvent]:
  """Every collective ``solution`` implies for ``graph``, by op, including
  those ``surcharges`` (``compiler.surcharge``) charged to chosen
  strategies, and the conversion of each fed-back output (``aliases``:
  (output tensor, input tensor)) to its input's layout at the step's end,
  charged to the op that makes it."""
  events = []
  surcharges = surcharges or {}
  for op_idx, name in solution.op_strategies:
    events.extend(CollectiveEvent(k, op_idx, None) for k in strategy_kinds(name))
    extra = surcharges.get((op_idx, name))
    if extra is not None:
      events.extend(CollectiveEvent(k, op_idx, None) for k in extra.kinds)
  spec_of = solution.spec_of
  mesh_shape = solution.mesh_shape
  by_index = {op.index: op for op in graph.all_ops()}
  # Layouts of a tensor already made: XLA reuses a gathered copy (common
  # subexpressions), so a later consumer that can slice what exists costs
  # no collective.
  made: dict[int, list] = {}
  for (op_idx, pos), want in sorted(solution.operand_specs):
    op = by_index.get(op_idx)
    if op is None:
      continue
    t = op.inputs[pos]
    if isinstance(t, Literal) or not graph.tensor(t).shape:
      continue
    have = made.setdefault(
        t, [spec_of.get(t, replicated(len(graph.tensor(t).shape)))])
    if any(not resharding_kinds(h, want, mesh_shape) for h in have):
      continue
    events.extend(CollectiveEvent(k, op_idx, pos)
                  for k in resharding_kinds(have[0], want, mesh_shape))
    have.append(want)
  # a cond's branch reshards each input it wants in another layout, inside
  # the branch (each branch a computation of its own)
  for op_idx, branches in graph.branches.items():
    op = by_index[op_idx]
    for branch in branches:
      for pos, (ref, t) in enumerate(zip(op.inputs[1:], branch.invars), 1):
        if isinstance(ref, Literal) or not graph.tensor(t).shape:
          continue
        rank = len(graph.tensor(t).shape)
        events.extend(CollectiveEvent(k, op_idx, pos) for k in resharding_kinds(
            spec_of.get(ref, replicated(rank)), spec_of.get(t, replicated(rank)),
            mesh_shape))
  maker = {t: op.index for op in graph.ops for t in op.outputs}
  for out_t, in_t in aliases:
    if out_t not in maker or not graph.tensor(out_t).shape:
      continue
    rank = len(graph.tensor(out_t).shape)
    events.extend(CollectiveEvent(k, maker[out_t], None) for k in
                  resharding_kinds(spec_of.get(out_t, replicated(rank)),
                                   spec_of.get(in_t, replicated(rank)),
                                   mesh_shape))
  return events


def count_collectives(graph: OpGraph, events, platform: str) -> dict[str, int]:
  """Per kind, how many collectives run once XLA has combined them.

  Within a combined family, the collectives that run are the levels of the
  longest dependent chain of the family's events; each event joins the
  latest level its consumers allow (XLA's combiner holds an independent
  collective back to merge it with later ones: the loss's all-reduce joins
  the gradients' reduction at the end of the step). A level counts once for
  each kind among its events.
  """
  families = COMBINED.get(platform, ())
  combined = frozenset().union(*families) if families else frozenset()
  counts = {k: 0 for k in KINDS}
  by_op: dict[int, list[CollectiveEvent]] = {}
  for e in events:
    by_op.setdefault(e.op, []).append(e)
    if e.kind not in combined:
      counts[e.kind] += 1
  # a scan body or a cond branch is a computation of its own: XLA combines
  # within it
  for family in families:
    for ops in graph.bodies():
      for kind, n in _family_levels(ops, by_op, family).items():
        counts[kind] += n
  return counts


def _family_levels(ops, by_op, family) -> dict[str, int]:
  """Per kind of ``family``, the levels of the family's longest chain in
  ``ops`` that hold an event of that kind (see ``count_collectives``)."""
  # after[t]: the longest chain of the family's events from reading t on
  after: dict[int, int] = {}
  rank: list[tuple[str, int]] = []  # (kind, chain length from the event)
  for op in reversed(ops):
    mine = [e for e in by_op.get(op.index, ()) if e.kind in family]
    tail = max((after.get(t, 0) for t in op.outputs), default=0)
    at_out = tail + any(e.operand is None for e in mine)
    rank.extend((e.kind, at_out) for e in mine if e.operand is None)
    for pos, t in enumerate(op.inputs):
      if isinstance(t, Literal):
        continue
      here = at_out + any(e.operand == pos for e in mine)
      rank.extend((e.kind, here) for e in mine if e.operand == pos)
      after[t] = max(after.get(t, 0), here)
  return {kind: len({r for k, r in rank if k == kind}) for kind in family}
