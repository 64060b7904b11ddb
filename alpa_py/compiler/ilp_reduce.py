"""Exact reduction of the strategy ILP before it reaches the solver.

A node with at most two neighbours can be eliminated without losing
optimality (as PBQP solvers do): a leaf's best strategy for each strategy of
its neighbour is folded into that neighbour's costs; a node between two others
becomes one edge between them whose entry (s, r) is the cheapest way through
it. Chains of followers, broadcasts of constants and step inputs used once
vanish this way, and the solver sees only the branching core.

Memory constraints couple nodes that no edge joins, so nodes that appear in
one are kept.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alpa_py.compiler.ilp_problem import Edge, MemoryConstraint, Problem


# One record per eliminated node: enough to recover its choice once the
# choices of the neighbours it was folded into are known. (eq=False: the
# pick tables are arrays, which have no single truth value to compare by.)
@dataclasses.dataclass(frozen=True, eq=False)
class Isolated:
  """A node left without neighbours: its own cheapest strategy."""

  v: int
  pick: int

  def choose(self, choice) -> int:
    return self.pick


@dataclasses.dataclass(frozen=True, eq=False)
class Leaf:
  """A node with one neighbour ``u``: its best strategy per strategy of u."""

  v: int
  u: int
  pick: np.ndarray  # [strategy of u] -> strategy of v

  def choose(self, choice) -> int:
    return int(self.pick[choice[self.u]])


@dataclasses.dataclass(frozen=True, eq=False)
class Chain:
  """A node between ``u`` and ``w``: its best strategy per pair of theirs."""

  v: int
  u: int
  w: int
  pick: np.ndarray  # [strategy of u, strategy of w] -> strategy of v

  def choose(self, choice) -> int:
    return int(self.pick[choice[self.u], choice[self.w]])


Step = Isolated | Leaf | Chain


@dataclasses.dataclass
class Reduction:
  """A reduced problem and how to recover the eliminated nodes' choices."""

  core: Problem
  core_nodes: list[int]  # core index -> original node
  steps: list[Step]  # eliminations, in order
  num_nodes: int


def class_edge(u: int, v: int, m: np.ndarray) -> Edge | None:
  """The edge of cost matrix ``m`` (strategy of u x strategy of v), alike
  rows and columns merged into classes; None where it costs nothing."""
  if not np.any(m):
    return None
  rows, u_class = np.unique(m, axis=0, return_inverse=True)
  cols, v_class = np.unique(rows, axis=1, return_inverse=True)
  return Edge(u, v, tuple(int(c) for c in u_class.ravel()),
              tuple(int(c) for c in v_class.ravel()),
              tuple(tuple(float(x) for x in r) for r in cols))


def reduce_problem(problem: Problem) -> Reduction:
  """Eliminates nodes of degree <= 2 (and fixed nodes) exactly."""
  n = len(problem.node_costs)
  cost = [np.asarray(c, dtype=np.float64) for c in problem.node_costs]
  edges: dict[tuple[int, int], np.ndarray] = {}
  adj: list[set[int]] = [set() for _ in range(n)]

  def add_edge(u, v, m):
    if u > v:
      u, v, m = v, u, m.T
    key = (u, v)
    if key in edges:
      edges[key] = edges[key] + m
    else:
      edges[key] = m.copy()
      adj[u].add(v)
      adj[v].add(u)

  def get_edge(u, v):
    return edges[(u, v)] if u < v else edges[(v, u)].T

  def drop_edge(u, v):
    edges.pop((min(u, v), max(u, v)), None)
    adj[u].discard(v)
    adj[v].discard(u)

  for e in problem.edges:
    if e.u == e.v:
      continue
    full = np.asarray(e.cost)[np.ix_(e.u_class, e.v_class)]
    add_edge(e.u, e.v, full)

  pinned = set()
  if problem.memory_budget is not None:
    for mc in problem.memory:
      for node, b in mc.terms:
        if len(b) > 1 and max(b) > min(b):
          pinned.add(node)

  alive = [True] * n
  steps: list[Step] = []
  stack = list(range(n))
  while stack:
    v = stack.pop()
    if not alive[v] or v in pinned:
      continue
    deg = len(adj[v])
    if len(cost[v]) == 1 and deg:
      # fixed strategy: its edges are linear terms of the neighbours
      for u in list(adj[v]):
        cost[u] = cost[u] + get_edge(u, v)[:, 0]
        drop_edge(u, v)
        stack.append(u)
      deg = 0
    if deg == 0:
      steps.append(Isolated(v, int(np.argmin(cost[v]))))
    elif deg == 1:
      (u,) = adj[v]
      tot = get_edge(u, v) + cost[v][None, :]
      cost[u] = cost[u] + tot.min(axis=1)
      steps.append(Leaf(v, u, tot.argmin(axis=1)))
      drop_edge(u, v)
      stack.append(u)
    elif deg == 2:
      u, w = sorted(adj[v])
      through = (get_edge(u, v) + cost[v][None, :])[:, :, None] + \
          get_edge(v, w)[None, :, :]
      steps.append(Chain(v, u, w, through.argmin(axis=1)))
      drop_edge(u, v)
      drop_edge(v, w)
      add_edge(u, w, through.min(axis=1))
      stack.extend((u, w))
    else:
      continue
    alive[v] = False

  core_nodes = [v for v in range(n) if alive[v]]
  index = {v: i for i, v in enumerate(core_nodes)}
  core_edges = []
  for (u, v), m in edges.items():
    e = class_edge(index[u], index[v], m)
    if e is not None:
      core_edges.append(e)
  memory = []
  for mc in problem.memory:
    # eliminated nodes were not pinned: their bytes do not depend on the choice
    fixed = mc.fixed_bytes + sum(b[0] for node, b in mc.terms if node not in index)
    memory.append(MemoryConstraint(
        tuple((index[node], b) for node, b in mc.terms if node in index),
        mc.label, fixed))
  memory = tuple(memory)
  core = Problem(tuple(tuple(float(x) for x in cost[v]) for v in core_nodes),
                 tuple(core_edges), memory, problem.memory_budget,
                 problem.time_limit_s)
  return Reduction(core, core_nodes, steps, n)


def expand(reduction: Reduction, core_choice) -> tuple[int, ...]:
  """The full assignment from the core's, undoing eliminations in reverse."""
  choice = [-1] * reduction.num_nodes
  for i, v in enumerate(reduction.core_nodes):
    choice[v] = int(core_choice[i])
  for step in reversed(reduction.steps):
    choice[step.v] = step.choose(choice)
  return tuple(choice)
