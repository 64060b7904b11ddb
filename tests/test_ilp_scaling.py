"""Repeated layers tied in the ILP (``ilp_symmetry``): found, exact for the
plans they allow, as good as the full ILP, and absent without repetition."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler import ilp, ilp_reduce, ilp_symmetry
from alpa_py.driver.analysis import StepAnalysis
from models_for_tests import gpt_setup, mlp_setup

_PROFILE = "a100_8x_nvlink_100gbps"
# the tests' models are small: no size gate, and two layers are a repetition
_ANY_SIZE = ilp_symmetry.SymmetryOption(min_nodes=0, min_repeats=2)


class _Built(Exception):
  """Raised by the recorder once the ILP is built (its solve is not needed)."""


def _problem_of(setup) -> ilp.Problem:
  """The ILP that ShardParallel on (2, 4) builds for a training step."""
  state, batch, step = setup
  seen = []
  solve = ilp.solve

  def record(problem, symmetry=None):
    seen.append(problem)
    raise _Built

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(ilp, "solve", record)
    with pytest.raises(_Built):
      StepAnalysis(step, (state, batch), num_devices=8).solve_method(
          alpa_py.ShardParallel(mesh_shape=(2, 4)), _PROFILE)
  assert ilp.solve is solve
  return seen[0]


def _small_gpt(layers):
  return gpt_setup(layers=layers, hidden=16, heads=2, seq=8, vocab=32)


@pytest.fixture(scope="module")
def gpt_problems():
  return {layers: _problem_of(_small_gpt(layers)) for layers in (2, 3)}


def _core(problem):
  return ilp_reduce.reduce_problem(problem).core


def test_finds_the_repeated_layers_of_a_gpt(gpt_problems):
  sizes = {}
  for layers, problem in gpt_problems.items():
    core = _core(problem)
    ties = ilp_symmetry.find_ties(core, _ANY_SIZE)
    assert ties is not None, layers
    assert ties.num_groups < 0.7 * len(core.node_costs), (layers, ties)
    sizes[layers] = ties.num_groups
  # one more layer adds nothing to the tied problem
  assert sizes[3] == sizes[2], sizes


def test_tied_plan_is_as_good_as_the_full_ilp(gpt_problems):
  problem = gpt_problems[2]
  full = ilp.solve(problem)
  tied = ilp.solve(problem, _ANY_SIZE)
  assert full.optimal and tied.tied_nodes > 0
  # the tied objective is the full problem's, at the lifted choice
  np.testing.assert_allclose(tied.objective, problem.objective(tied.choice),
                             rtol=1e-12)
  assert tied.objective <= 1.01 * full.objective, (tied, full)
  assert tied.objective >= (1 - 1e-4) * full.objective  # (LP tolerances)


def _random_tied_problem(rng, copies, memory):
  """``copies`` identical blocks of 3 nodes in a chain, plus one distinct
  node linked to every block."""
  block_costs = [tuple(float(c) for c in rng.uniform(0, 10, 3))
                 for _ in range(3)]
  inner = [tuple(tuple(float(x) for x in r) for r in rng.uniform(0, 5, (3, 3)))
           for _ in range(3)]
  costs = [tuple(float(c) for c in rng.uniform(0, 10, 2))]
  edges = []
  hub = tuple(tuple(float(x) for x in r) for r in rng.uniform(0, 5, (2, 3)))
  for k in range(copies):
    base = 1 + 3 * k
    costs.extend(block_costs)
    edges.append(ilp.Edge(base, base + 1, (0, 1, 2), (0, 1, 2), inner[0]))
    edges.append(ilp.Edge(base + 1, base + 2, (0, 1, 2), (0, 1, 2), inner[1]))
    edges.append(ilp.Edge(0, base, (0, 1), (0, 1, 2), hub))
    if k:
      edges.append(ilp.Edge(base - 1, base, (0, 1, 2), (0, 1, 2), inner[2]))
  mem, budget = (), None
  if memory:
    mem = (ilp.MemoryConstraint(tuple((1 + 3 * k, (3.0, 2.0, 1.0))
                                      for k in range(copies))),)
    budget = 2.0 * copies
  return ilp.Problem(tuple(costs), tuple(edges), mem, budget, 30.0)


@pytest.mark.parametrize("seed", range(6))
def test_quotient_is_exact_for_the_plans_it_allows(seed):
  rng = np.random.default_rng(seed)
  problem = _random_tied_problem(rng, copies=5, memory=seed % 2 == 1)
  # tie block k's j-th node with every other block's j-th node
  group = (0,) + tuple(1 + j for _ in range(5) for j in range(3))
  ties = ilp_symmetry.Ties(group, 4, 15)
  q = ilp_symmetry.quotient(problem, ties)
  for choice in np.ndindex(*[len(c) for c in q.node_costs]):
    lifted = ties.lift(choice)
    np.testing.assert_allclose(q.objective(choice), problem.objective(lifted),
                               rtol=1e-12)
    assert q.memory_ok(choice) == problem.memory_ok(lifted)


@pytest.mark.parametrize("seed", range(4))
def test_colour_refinement_ties_the_blocks(seed):
  rng = np.random.default_rng(10 + seed)
  problem = _random_tied_problem(rng, copies=6, memory=False)
  # the stable colouring tells a chain's blocks apart by their distance
  # from its ends; two rounds see only their neighbours
  stable = ilp_symmetry.SymmetryOption(min_nodes=0, min_saving=0.0)
  assert ilp_symmetry.find_ties(problem, stable) is None
  option = dataclasses.replace(stable, rounds=2)
  ties = ilp_symmetry.find_ties(problem, option)
  assert ties is not None and ties.num_tied >= 6
  # (ilp.solve would tie the core left by the exact reduction: none here)
  tied = ilp_symmetry.solve_tied(problem, ties, ilp.solve)
  full = ilp.solve(problem)
  assert tied.tied_nodes == ties.num_tied
  picks = {}
  for v, g in enumerate(ties.group):  # one strategy per group
    assert picks.setdefault(g, tied.choice[v]) == tied.choice[v]
  assert tied.objective >= full.objective - 1e-9
  np.testing.assert_allclose(tied.objective, problem.objective(tied.choice),
                             rtol=1e-12)


def test_no_repetition_no_ties():
  # layer widths all differ: no two dots alike
  problem = _problem_of(mlp_setup(hidden=64, layers=2))
  assert ilp_symmetry.find_ties(_core(problem), _ANY_SIZE) is None
  assert ilp.solve(problem, _ANY_SIZE).choice == ilp.solve(problem).choice


@pytest.mark.parametrize("seed", range(5))
def test_random_problems_are_left_alone(seed):
  rng = np.random.default_rng(seed)
  n = 12
  costs = tuple(tuple(float(c) for c in rng.uniform(0, 10, 3))
                for _ in range(n))
  edges = tuple(ilp.Edge(u, u + 1, (0, 1, 2), (0, 1, 2), tuple(
      tuple(float(x) for x in r) for r in rng.uniform(0, 5, (3, 3))))
      for u in range(n - 1))
  problem = ilp.Problem(costs, edges)
  assert ilp_symmetry.find_ties(problem, _ANY_SIZE) is None
  tied, full = ilp.solve(problem, _ANY_SIZE), ilp.solve(problem)
  assert tied.choice == full.choice and tied.tied_nodes == 0


@pytest.mark.slow
def test_tied_plan_runs_and_matches_one_device(monkeypatch):
  results = []
  solve = ilp.solve

  def record(problem, symmetry=None):
    results.append(solve(problem, symmetry))
    return results[-1]

  monkeypatch.setattr(ilp, "solve", record)
  # the default gates leave a model this small to the full ILP
  monkeypatch.setattr(ilp_symmetry, "SymmetryOption", functools.partial(
      ilp_symmetry.SymmetryOption, min_nodes=0, min_repeats=2))
  state, batch, step = _small_gpt(2)
  method = alpa_py.ShardParallel(
      devices=jax.devices()[:8], mesh_shape=(2, 4),
      auto_sharding_option=alpa_py.AutoShardingOption(cost_profile=_PROFILE))
  new_state, loss = alpa_py.parallelize(step, method=method)(state, batch)
  assert any(r.tied_nodes > 0 for r in results), results
  ref_state, ref_loss = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                              rtol=1e-4, atol=1e-5),
      new_state.params, ref_state.params)
