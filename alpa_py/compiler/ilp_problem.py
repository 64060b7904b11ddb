"""The auto-sharding ILP's data: problem, solution, infeasibility.

Shared by the solver (``ilp``) and the exact reduction (``ilp_reduce``), which
therefore depend on these types rather than on each other.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Edge:
  """Resharding cost between two nodes, over classes of their strategies."""

  u: int
  v: int
  u_class: tuple[int, ...]  # strategy of u -> class index
  v_class: tuple[int, ...]
  cost: tuple[tuple[float, ...], ...]  # [class of u][class of v]


@dataclasses.dataclass(frozen=True)
class MemoryConstraint:
  """Bytes per device at one liveness point: sum of terms <= budget."""

  terms: tuple[tuple[int, tuple[float, ...]], ...]  # (node, bytes per strategy)
  label: str = ""
  fixed_bytes: float = 0.0  # bytes that no choice changes


@dataclasses.dataclass(frozen=True)
class Problem:
  """An auto-sharding ILP.

  Attributes:
    node_costs: per node, the cost of each strategy (seconds).
    edges: resharding costs between nodes.
    memory: memory constraints (empty: no budget).
    memory_budget: bytes per device.
    time_limit_s: solver wall-clock limit.
  """

  node_costs: tuple[tuple[float, ...], ...]
  edges: tuple[Edge, ...] = ()
  memory: tuple[MemoryConstraint, ...] = ()
  memory_budget: float | None = None
  time_limit_s: float = 60.0

  def objective(self, choice) -> float:
    """The cost of a full assignment (used by tests and brute force)."""
    total = sum(c[s] for c, s in zip(self.node_costs, choice))
    for e in self.edges:
      total += e.cost[e.u_class[choice[e.u]]][e.v_class[choice[e.v]]]
    return total

  def memory_ok(self, choice) -> bool:
    if self.memory_budget is None:
      return True
    return all(m.fixed_bytes + sum(b[choice[n]] for n, b in m.terms)
               <= self.memory_budget for m in self.memory)


@dataclasses.dataclass(frozen=True)
class Solution:
  """A solved ILP."""

  choice: tuple[int, ...]
  objective: float
  status: str  # "OPTIMAL" or "FEASIBLE" (time limit hit)
  num_variables: int
  num_constraints: int
  solve_seconds: float
  # nodes tied to alike nodes of repeated layers (``ilp_symmetry``): where
  # > 0, OPTIMAL means optimal among plans that give them one strategy
  tied_nodes: int = 0

  @property
  def optimal(self) -> bool:
    return self.status == "OPTIMAL"


@dataclasses.dataclass(frozen=True)
class Infeasible:
  """No assignment meets the constraints."""

  status: str
  min_bytes_needed: float
  budget: float | None
  worst_point: str
  num_variables: int
  num_constraints: int
  solve_seconds: float


def min_memory_needed(problem: Problem) -> tuple[float, str]:
  """A lower bound on peak bytes per device: each node at its smallest."""
  worst, label = 0.0, ""
  for m in problem.memory:
    need = m.fixed_bytes + sum(min(b) for _, b in m.terms)
    if need > worst:
      worst, label = need, m.label
  return worst, label
