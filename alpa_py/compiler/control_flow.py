"""Control flow the intra-op pass cannot look into, and the warning it gets.

A ``scan`` is planned through its body (``graph.Region``) and a ``cond``
through its branches (``graph.Branch``). A ``while`` whose trip count is
unknown until it runs (and a ``cond`` whose branches could not be read)
stays a single op whose operands and results are replicated
(``strategies.rules.REPLICATED``): correct, but every device does all of
its work. ``warn_replicated``
names each such op once per compile, with its share of the step's FLOPs (a
``while`` body counted once: its trip count is unknown), so that a user
can see what is left unsharded and rewrite it (a ``jax.lax.scan`` or a
``fori_loop`` with static bounds, which JAX lowers to a scan).
"""

from __future__ import annotations

import warnings

from alpa_py.compiler.graph import OpGraph

_OPAQUE = ("while", "cond")


class ReplicatedControlFlowWarning(UserWarning):
  """A ``while`` or ``cond`` runs replicated: the plan does not shard it."""


def replicated_control_flow(graph: OpGraph) -> list[tuple[int, str, float]]:
  """(op index, primitive, share of the step's FLOPs) of each ``while`` /
  ``cond`` that the plan keeps replicated, in program order."""
  total = sum(op.flops * op.trips for op in graph.ops) or 1.0
  return [(op.index, op.name, op.flops * op.trips / total)
          for op in graph.all_ops()
          if op.name in _OPAQUE and op.index not in graph.branches]


def warn_replicated(graph: OpGraph) -> None:
  """Warns once per ``while`` / ``cond`` of ``graph`` (see module doc)."""
  for index, name, share in replicated_control_flow(graph):
    why = ("its trip count is unknown before it runs"
           if name == "while" else "a branch is chosen at run time")
    warnings.warn(ReplicatedControlFlowWarning(
        f"`{name}` #{index} ({share:.1%} of the step's FLOPs, its body counted "
        f"once) is kept replicated: {why}, so alpa_py does not plan through "
        "it and every device does all of its work. Where the trip count is "
        "known, write it as jax.lax.scan (or fori_loop with static bounds) "
        "to have its body sharded."), stacklevel=3)
