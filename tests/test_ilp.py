"""The ILP solver and its exact reduction against brute force."""

import dataclasses
import itertools

import numpy as np
import pytest

from alpa_py.compiler import ilp, ilp_reduce


def random_problem(rng, n_nodes, n_edges, max_strats=4, memory=False,
                   same_class=False):
  costs = tuple(tuple(float(c) for c in rng.uniform(0, 10, rng.integers(1, max_strats + 1)))
                for _ in range(n_nodes))
  pairs = [(u, v) for u, v in itertools.combinations(range(n_nodes), 2)]
  rng.shuffle(pairs)
  edges = []
  for u, v in pairs[:n_edges]:
    su, sv = len(costs[u]), len(costs[v])
    if same_class and su > 1:
      u_class = tuple(int(c) for c in rng.integers(0, su - 1, su))
      nu = max(u_class) + 1
    else:
      u_class, nu = tuple(range(su)), su
    m = rng.uniform(0, 10, (nu, sv))
    m[rng.uniform(size=m.shape) < 0.3] = 0.0
    edges.append(ilp.Edge(u, v, u_class, tuple(range(sv)),
                          tuple(tuple(float(x) for x in r) for r in m)))
  mem, budget = (), None
  if memory:
    mem = tuple(
        ilp.MemoryConstraint(tuple((n, tuple(float(b) for b in rng.uniform(1, 5, len(costs[n]))))
                                   for n in rng.choice(n_nodes, 3, replace=False)))
        for _ in range(2))
    budget = float(rng.uniform(6, 12))
  return ilp.Problem(costs, tuple(edges), mem, budget, 30.0)


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  problem = random_problem(rng, n_nodes=int(rng.integers(3, 7)),
                           n_edges=int(rng.integers(2, 10)),
                           memory=seed % 3 == 0, same_class=seed % 2 == 0)
  best = ilp.solve_brute_force(problem)
  result = ilp.solve(problem)
  if best is None:
    assert isinstance(result, ilp.Infeasible)
    return
  assert isinstance(result, ilp.Solution), result
  assert result.optimal
  assert problem.memory_ok(result.choice)
  np.testing.assert_allclose(result.objective, best[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_reduction_is_exact_on_chains_and_trees(seed):
  rng = np.random.default_rng(100 + seed)
  n = 7
  costs = tuple(tuple(float(c) for c in rng.uniform(0, 5, rng.integers(1, 5)))
                for _ in range(n))
  edges = []
  for v in range(1, n):  # a random tree: fully reducible
    u = int(rng.integers(0, v))
    m = rng.uniform(0, 5, (len(costs[u]), len(costs[v])))
    edges.append(ilp.Edge(u, v, tuple(range(len(costs[u]))),
                          tuple(range(len(costs[v]))),
                          tuple(tuple(float(x) for x in r) for r in m)))
  problem = ilp.Problem(costs, tuple(edges))
  red = ilp_reduce.reduce_problem(problem)
  assert red.core_nodes == []  # nothing left for the solver
  choice = ilp_reduce.expand(red, ())
  np.testing.assert_allclose(problem.objective(choice),
                             ilp.solve_brute_force(problem)[1], rtol=1e-12)


def test_infeasible_reports_min_bytes():
  problem = ilp.Problem(
      ((0.0, 1.0), (0.0, 1.0)), (),
      (ilp.MemoryConstraint(((0, (5.0, 3.0)), (1, (5.0, 4.0))), "peak"),),
      memory_budget=6.0)
  result = ilp.solve(problem)
  assert isinstance(result, ilp.Infeasible)
  assert result.min_bytes_needed == 7.0
  assert result.worst_point == "peak"


def test_result_reports_size_and_time():
  rng = np.random.default_rng(0)
  problem = random_problem(rng, 6, 8)
  result = ilp.solve(problem)
  assert result.solve_seconds >= 0
  assert result.status in ("OPTIMAL", "FEASIBLE")


@pytest.mark.parametrize("budget, feasible", [(100.0, True), (5.0, False)])
def test_no_choice_left_under_a_budget(budget, feasible):
  """Regression: nodes with one strategy each and a budget (6 bytes needed)
  were reported infeasible with solver status 99 whatever the budget."""
  problem = ilp.Problem(
      ((1.0,), (2.0,)), (),
      (ilp.MemoryConstraint(((0, (2.0,)), (1, (4.0,))), "peak"),),
      memory_budget=budget)
  result = ilp.solve(problem)
  if feasible:
    assert isinstance(result, ilp.Solution) and result.objective == 3.0
    assert result.status == "OPTIMAL"
  else:
    assert isinstance(result, ilp.Infeasible)
    assert result.min_bytes_needed == 6.0 and result.status == "INFEASIBLE"


def test_a_memory_point_without_choice_binds_beside_others():
  fixed_point = ilp.MemoryConstraint(((1, (4.0,)),), "fixed", fixed_bytes=2.0)
  choice_point = ilp.MemoryConstraint(((0, (3.0, 1.0)), (1, (4.0,))), "peak")
  problem = ilp.Problem(((1.0, 2.0), (2.0,)), (), (fixed_point, choice_point),
                        memory_budget=6.5)
  result = ilp.solve(problem)
  assert isinstance(result, ilp.Solution) and result.choice == (1, 0)
  tight = ilp.solve(dataclasses.replace(problem, memory_budget=5.5))
  assert isinstance(tight, ilp.Infeasible)
