"""Repeated layers in the strategy ILP: find them, tie them, solve once.

A model built from identical layers (GPT blocks, MoE blocks, an MLP stack)
gives an ILP made of identical sub-problems: the same strategy costs and the
same resharding matrices between the same kinds of nodes, layer after layer.
The solver proves the same choice again for each of them, and its LP grows
faster than linearly in the number of layers.

``find_ties`` finds the repetition in the problem itself, without model or
graph knowledge, by colour refinement (1-dimensional Weisfeiler-Leman): a
node's colour starts as its strategy costs (and its bytes, under a memory
budget), and each round splits colours by the multiset of (resharding
matrix, neighbour colour) around each node, until a round splits nothing.
Nodes of one colour then have alike neighbourhoods however deep one looks:
the same op of two identical layers, where nothing near the model's ends
tells them apart; a node whose neighbourhood differs (a layer next to the
embedding, say, where that matters to the costs) keeps a colour of its own.

Every colour of at least ``min_repeats`` nodes becomes one node of the
quotient ILP (``quotient``): its nodes take one strategy. The quotient is
exact for the plans it allows: the group's costs, the resharding between
its nodes (the diagonal: both ends take one strategy) and its bytes at each
memory point add up, so its objective and memory equal the full problem's
at the lifted choice (``Ties.lift``). And it loses nothing the LP can see:
the stable colouring is an equitable partition of the LP (without a memory
budget), so the quotient LP's optimum equals the full LP's (Grohe, Kersting,
Mladenov, Selman, "Dimension reduction via colour refinement", ESA 2014);
where that optimum is integral, as it usually is for these problems, the
lifted plan is optimal for the full ILP. Under a memory budget the memory
points are not part of the colouring, so the tie is a restriction that may
cost optimality; a quotient without a plan hands the problem back to the
full ILP (``solve_tied`` returns None).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from alpa_py.compiler.ilp_problem import (Edge, Infeasible, MemoryConstraint,
                                          Problem, Solution)
from alpa_py.compiler.ilp_reduce import class_edge

# Costs and bytes of alike nodes agree to this many mantissa bits (sums taken
# in another order differ in the last bits).
_BITS = 30


@dataclasses.dataclass(frozen=True)
class SymmetryOption:
  """How ``find_ties`` looks for repetition.

  Attributes:
    rounds: colour-refinement rounds; None: until a round splits no colour
      (the stable colouring, which keeps the LP optimum: see the module
      docstring). A number ties nodes alike only that many edges deep: it
      also ties the interior layers of a chain of layers (which the stable
      colouring tells apart by their distance from the ends), but it is a
      heuristic that may cost optimality.
    min_repeats: a colour is tied only where at least this many nodes share
      it (a few alike nodes are not a repeated layer).
    min_nodes: problems with fewer nodes that have a choice are solved whole
      (they solve fast anyway).
    min_saving: tie only where the quotient drops at least this fraction of
      the nodes that have a choice.
  """

  rounds: int | None = None
  min_repeats: int = 3
  min_nodes: int = 100
  min_saving: float = 0.25

  def __post_init__(self):
    r = self.rounds
    if r is not None and (not isinstance(r, int) or r < 1):
      raise ValueError(f"rounds (={r!r}) must be a positive int or None")
    if not isinstance(self.min_repeats, int) or self.min_repeats < 2:
      raise ValueError(f"min_repeats (={self.min_repeats!r}) must be >= 2")
    if not isinstance(self.min_nodes, int) or self.min_nodes < 0:
      raise ValueError(f"min_nodes (={self.min_nodes!r}) must be >= 0")
    if not 0.0 <= self.min_saving < 1.0:
      raise ValueError(f"min_saving (={self.min_saving!r}) must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class Ties:
  """A partition of a problem's nodes: nodes of one group take one strategy.

  Attributes:
    group: node -> its group (groups are numbered 0..num_groups-1 in order of
      their first node).
    num_groups: the quotient's node count.
    num_tied: nodes in groups of more than one node.
  """

  group: tuple[int, ...]
  num_groups: int
  num_tied: int

  def lift(self, quotient_choice) -> tuple[int, ...]:
    """The full problem's choice: each node takes its group's strategy."""
    return tuple(int(quotient_choice[g]) for g in self.group)


def _key(values) -> bytes:
  mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float64))
  return np.round(mantissa * 2.0**_BITS).astype(np.int64).tobytes() + \
      exponent.astype(np.int16).tobytes()


def _edge_matrix(e: Edge) -> np.ndarray:
  return np.asarray(e.cost, dtype=np.float64)[np.ix_(e.u_class, e.v_class)]


def colours(problem: Problem, rounds: int | None = None) -> list[int]:
  """Colour refinement: nodes of one colour have alike neighbourhoods
  ``rounds`` edges deep (costs, bytes, resharding matrices); None: however
  deep (until a round splits no colour)."""
  n = len(problem.node_costs)
  ids: dict = {}

  def intern(key) -> int:
    return ids.setdefault(key, len(ids))

  byte_keys: list[set] = [set() for _ in range(n)]
  if problem.memory_budget is not None:
    for m in problem.memory:
      for node, b in m.terms:
        byte_keys[node].add(_key(b))
  colour = [intern((len(c), _key(c), tuple(sorted(byte_keys[v]))))
            for v, c in enumerate(problem.node_costs)]
  adj: list[list[tuple[int, int]]] = [[] for _ in range(n)]
  for e in problem.edges:
    if e.u == e.v:
      continue
    m = _edge_matrix(e)
    adj[e.u].append((intern(("u", m.shape, _key(m.ravel()))), e.v))
    adj[e.v].append((intern(("v", m.shape[::-1], _key(m.T.ravel()))), e.u))
  for _ in range(n if rounds is None else rounds):
    table: dict = {}
    new = [table.setdefault(
        (colour[v], tuple(sorted((s, colour[w]) for s, w in adj[v]))),
        len(table)) for v in range(n)]
    if len(table) == len(set(colour)):
      break  # stable: more rounds split nothing
    colour = new
  return colour


def find_ties(problem: Problem,
              option: SymmetryOption = SymmetryOption()) -> Ties | None:
  """Groups of alike nodes worth tying, or None where the problem has no
  repetition worth it (too small, or too few alike nodes)."""
  free = sum(1 for c in problem.node_costs if len(c) > 1)
  if free < option.min_nodes:
    return None
  colour = colours(problem, option.rounds)
  members: dict[int, list[int]] = {}
  for v, c in enumerate(colour):
    members.setdefault(c, []).append(v)
  group = [-1] * len(colour)
  count = 0
  num_tied = 0
  for v, c in enumerate(colour):
    if group[v] >= 0:
      continue
    nodes = members[c]
    if len(nodes) >= option.min_repeats and len(problem.node_costs[v]) > 1:
      for w in nodes:
        group[w] = count
      num_tied += len(nodes)
    else:
      group[v] = count
    count += 1
  if count == len(colour) or \
      len(colour) - count < option.min_saving * free:
    return None
  return Ties(tuple(group), count, num_tied)


def quotient(problem: Problem, ties: Ties) -> Problem:
  """The problem over groups: a group's costs, bytes and inner resharding
  added up, its edges to other groups summed. Exact: its objective and
  memory at a choice equal the full problem's at ``ties.lift(choice)``."""
  g = ties.group
  cost = [None] * ties.num_groups
  for v, c in enumerate(problem.node_costs):
    c = np.asarray(c, dtype=np.float64)
    cost[g[v]] = c.copy() if cost[g[v]] is None else cost[g[v]] + c
  edges: dict[tuple[int, int], np.ndarray] = {}
  for e in problem.edges:
    m = _edge_matrix(e)
    a, b = g[e.u], g[e.v]
    if a == b:
      cost[a] = cost[a] + np.diagonal(m)  # both ends take one strategy
      continue
    if a > b:
      a, b, m = b, a, m.T
    edges[(a, b)] = edges[(a, b)] + m if (a, b) in edges else m
  memory = []
  for mc in problem.memory:
    terms: dict[int, np.ndarray] = {}
    for node, b in mc.terms:
      b = np.asarray(b, dtype=np.float64)
      terms[g[node]] = terms[g[node]] + b if g[node] in terms else b
    memory.append(MemoryConstraint(
        tuple((k, tuple(float(x) for x in b)) for k, b in terms.items()),
        mc.label, mc.fixed_bytes))
  merged = (class_edge(a, b, m) for (a, b), m in edges.items())
  return Problem(tuple(tuple(float(x) for x in c) for c in cost),
                 tuple(e for e in merged if e is not None),
                 tuple(memory), problem.memory_budget, problem.time_limit_s)


def solve_tied(problem: Problem, ties: Ties,
               solve_full: Callable[[Problem], Solution | Infeasible]
               ) -> Solution | None:
  """Solves the quotient with ``solve_full`` and lifts its plan; None where
  the quotient has no plan (the caller then solves the full problem).

  The solution's objective is the full problem's at the lifted choice; its
  status is the quotient's (OPTIMAL: optimal among plans that tie the
  groups), and ``tied_nodes`` says how many nodes were tied."""
  t0 = time.perf_counter()
  q = quotient(problem, ties)
  result = solve_full(q)
  if not isinstance(result, Solution):
    return None
  choice = ties.lift(result.choice)
  if not problem.memory_ok(choice):
    return None  # (exact quotient: only rounding could get here)
  return Solution(choice, problem.objective(choice), result.status,
                  result.num_variables, result.num_constraints,
                  time.perf_counter() - t0, tied_nodes=ties.num_tied)
