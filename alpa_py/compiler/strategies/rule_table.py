"""The rule table: primitive name -> its sharding rule and follow kind.

The rule modules (``rules``, ``rules_indexing``) fill it through
``register``; ``registry`` reads it. Kept apart from the rules so that both
rule modules can register without importing each other.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Sequence

from alpa_py.compiler.graph import Op, TensorInfo
from alpa_py.compiler.strategies.loop_nest import LoopNest

Rule = Callable[[Op, Sequence[TensorInfo | None], Sequence[TensorInfo]],
                LoopNest]


class Follow(enum.Enum):
  """Whether the intra-op pass merges an op into one operand's ILP node.

  A follower gets no ILP variable: for each strategy of that operand's node
  it takes its cheapest strategy given the operand's spec. This keeps the
  ILP to roughly dots + reductions + broadcasts + inputs.
  """

  NONE = "none"  # a node of its own: the ILP picks its strategy
  # follows an operand with as many elements as its output (elementwise,
  # reshape, transpose, ...): the layout carries over unchanged
  SAME_SIZE = "same_size"
  # follows any operand with a shape (reductions, broadcasts): the reduced /
  # broadcast dims are then decided by the operand's layout (and, for sums
  # over a split dim, all-reduce or reduce-scatter, whichever is cheaper)
  ANY_SIZE = "any_size"


@dataclasses.dataclass(frozen=True)
class RuleEntry:
  """A primitive's rule and how the intra-op pass treats it.

  Attributes:
    rule: op -> loop nest.
    follow: whether the op follows an operand (see ``Follow``).
    follow_min_shards: when following, prefer the strategy whose output is
      split into the fewest shards, cost second (a broadcast then leaves its
      new dims whole rather than splitting them because that looks cheaper
      here, whatever the consumers pay for it).
    heavy: a key op (dot, convolution): its FLOPs dominate the step, plans
      list its strategy, and layer clustering keeps two apart.
  """

  rule: Rule
  follow: Follow = Follow.NONE
  follow_min_shards: bool = False
  heavy: bool = False


RULES: dict[str, RuleEntry] = {}


def register(*names: str, follow: Follow = Follow.NONE,
             follow_min_shards: bool = False, heavy: bool = False):
  """Decorator: registers a rule for the named primitives.

  Raises:
    ValueError: a name already has a rule (each primitive has one place).
  """

  def wrap(fn: Rule) -> Rule:
    entry = RuleEntry(fn, follow, follow_min_shards, heavy)
    for n in names:
      if n in RULES:
        raise ValueError(f"primitive `{n}` already has a sharding rule")
      RULES[n] = entry
    return fn

  return wrap
