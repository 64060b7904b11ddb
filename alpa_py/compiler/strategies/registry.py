"""The strategy registry: op -> strategies, with an explicit default.

Everything the compiler knows per primitive is asked of it: the loop nest
(hence the strategies and their costs) and whether the op follows an operand
(``follow_kind``), both from the primitive's one ``register`` call.
"""

from __future__ import annotations

import warnings

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import Literal, Op, OpGraph, TensorInfo
# rules_indexing is imported for its registrations: they fill RULES.
from alpa_py.compiler.strategies import rules_indexing  # noqa: F401
from alpa_py.compiler.strategies.loop_nest import (LoopNest, Strategy,
                                                   enumerate_strategies,
                                                   replicated_nest)
from alpa_py.compiler.strategies.rule_table import RULES, Follow
from alpa_py.compiler.strategies.rules import default_rule

_warned: set[str] = set()


class UnsupportedPrimitiveWarning(UserWarning):
  """A primitive without a sharding rule was kept replicated."""


def _warn_unsupported(name: str) -> None:
  if name in _warned:
    return
  _warned.add(name)
  warnings.warn(
      f"alpa_py has no sharding rule for primitive `{name}`; its operands and "
      "results are kept replicated (correct, but every device does the whole "
      "op). Add a rule in alpa_py/compiler/strategies/rules.py to shard it.",
      UnsupportedPrimitiveWarning, stacklevel=3)


def loop_nest_for(op: Op, graph: OpGraph) -> LoopNest:
  """The op's loop nest from its rule (or the replicated default)."""
  ins = [None if isinstance(t, Literal) else graph.tensor(t) for t in op.inputs]
  outs = [graph.tensor(t) for t in op.outputs]
  entry = RULES.get(op.name)
  if entry is None:
    _warn_unsupported(op.name)
    rule = default_rule
  else:
    rule = entry.rule
  try:
    return rule(op, ins, outs)
  except (KeyError, IndexError, AttributeError, TypeError) as e:
    # A parameter layout this rule does not know (a newer JAX): stay correct.
    warnings.warn(f"sharding rule for `{op.name}` failed ({e!r}); kept "
                  "replicated", UnsupportedPrimitiveWarning, stacklevel=2)
    return replicated_nest(ins, outs)


def follow_kind(name: str) -> Follow:
  """Whether ops of primitive ``name`` follow an operand (see ``Follow``)."""
  entry = RULES.get(name)
  return Follow.NONE if entry is None else entry.follow


def is_heavy(name: str) -> bool:
  """Whether ``name`` is a key op (dot, convolution; see ``RuleEntry``)."""
  entry = RULES.get(name)
  return entry is not None and entry.heavy


def follows_min_shards(name: str) -> bool:
  """Whether a following op prefers its least-split output, cost second."""
  entry = RULES.get(name)
  return entry is not None and entry.follow_min_shards


def strategies_for(op: Op, graph: OpGraph, mesh: LogicalMesh, *,
                   prefer_reduce_scatter: bool = False,
                   allow_mixed_mesh_shape: bool = False,
                   fused: bool = False) -> list[Strategy]:
  """All strategies of one op on a mesh (``fused``: its bytes after XLA's
  fusion, ``OpGraph.fused_bytes``)."""
  nest = loop_nest_for(op, graph)
  ins = [None if isinstance(t, Literal) else graph.tensor(t) for t in op.inputs]
  outs = [graph.tensor(t) for t in op.outputs]
  return enumerate_strategies(
      nest, ins, outs, op.flops,
      graph.fused_bytes.get(op.index, op.bytes_accessed) if fused
      else op.bytes_accessed, mesh,
      prefer_reduce_scatter=prefer_reduce_scatter,
      allow_mixed_mesh_shape=allow_mixed_mesh_shape)


def tensor_strategies(info: TensorInfo, mesh: LogicalMesh) -> list[Strategy]:
  """Every layout of a standalone tensor (a step input)."""
  r = len(info.shape)
  nest = LoopNest(sizes=info.shape, shardable=(True,) * r, in_maps=(),
                  out_maps=(tuple(range(r)),),
                  labels=tuple(f"d{d}" for d in range(r)))
  return enumerate_strategies(nest, [], [info], 0.0, 0.0, mesh)
