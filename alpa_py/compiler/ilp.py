"""The auto-sharding ILP and its OR-Tools solver.

``solve(problem) -> Solution | Infeasible`` is pure: it reduces the problem
exactly (``ilp_reduce``), solves the LP relaxation of the core with HiGHS
through OR-Tools' ``pywraplp`` (an integral LP optimum is an ILP optimum), and
only where the LP leaves a gap runs the MIP solver (HiGHS, else CBC) under the
time limit. It reports status, objective, size and wall time. Given a
``SymmetryOption``, it ties the core's alike nodes (repeated layers) and
solves the smaller quotient instead (``ilp_symmetry``).

A backend that is missing from the OR-Tools build, raises, or returns an error
status (ABNORMAL, MODEL_INVALID, NOT_SOLVED before its time limit) hands the
problem to the next backend with a ``SolverFallbackWarning`` naming both; an
infeasible problem is reported as such by the first backend.

Model: a binary x[n, s] per node n and strategy s, one per node; per edge
(u, v) a continuous e[a, b] over pairs of strategy *classes* (strategies that
look alike to that edge), tied to x by marginals
    sum_b e[a, b] = sum_{s in class a of u} x[u, s]
    sum_a e[a, b] = sum_{t in class b of v} x[v, t]
which forces e to the one pair chosen once x is integral. Memory: at each
chosen liveness point, sum_n sum_s bytes[n, s] x[n, s] <= budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import os
import sys
import time
import warnings

import numpy as np
from ortools.linear_solver import pywraplp

from alpa_py.compiler import ilp_reduce, ilp_symmetry
# Re-exported: callers build and read problems through ``ilp`` alone.
from alpa_py.compiler.ilp_problem import (Edge, Infeasible, MemoryConstraint,
                                          Problem, Solution, min_memory_needed)

__all__ = ["Edge", "Infeasible", "MemoryConstraint", "Problem", "Solution",
           "SolverFallbackWarning", "min_memory_needed", "solve",
           "solve_brute_force"]

# OR-Tools backends, tried in order: HiGHS solves these LPs ~15x faster than
# GLOP and the MIPs faster than CBC; each later one stands in for the one
# before it where that one is missing from the build or fails.
LP_BACKENDS = ("HIGHS_LP", "GLOP")
MIP_BACKENDS = ("HIGHS", "CBC", "SCIP")
# Backends that crash the process (SIGSEGV inside ``Solve``, so there is no
# status to fall back on) when the named module's native libraries were
# loaded before OR-Tools'. ``alpa_py/__init__`` loads OR-Tools first, which
# avoids it unless the user imported the module before alpa_py.
_CRASH_IF_LOADED_FIRST = {"HIGHS_LP": "tensorflow", "HIGHS": "tensorflow"}
# A fallback backend needs at least this much of the time limit left.
_MIN_FALLBACK_SECONDS = 1.0


class SolverFallbackWarning(UserWarning):
  """An OR-Tools backend could not solve the ILP and another one did."""


def solve(problem: Problem, symmetry: ilp_symmetry.SymmetryOption | None = None
          ) -> Solution | Infeasible:
  """Solves the ILP: exact reduction (``ilp_reduce``), then OR-Tools on the
  core (the LP relaxation with HiGHS, the MIP only where it leaves a gap).

  Deterministic for a given problem. The sizes reported are the core's.

  Args:
    problem: the ILP.
    symmetry: where given, alike nodes of the core (repeated layers) are
      tied and the smaller quotient is solved (``ilp_symmetry``); the full
      core is solved where there is no repetition or the quotient has no
      plan. None: the full core.

  Raises:
    RuntimeError: no OR-Tools backend could solve it (each one's failure is
      named); one that fails hands over to the next with a
      ``SolverFallbackWarning``.
  """
  t0 = time.perf_counter()
  reduction = ilp_reduce.reduce_problem(problem)
  core = _solve_fixed(reduction.core)
  if core is None and symmetry is not None:
    ties = ilp_symmetry.find_ties(reduction.core, symmetry)
    if ties is not None:
      core = ilp_symmetry.solve_tied(reduction.core, ties, solve)
  if core is None:
    core = _solve_core(reduction.core)
  elapsed = time.perf_counter() - t0
  if isinstance(core, Infeasible):
    need, label = min_memory_needed(problem)
    return dataclasses.replace(core, min_bytes_needed=need, worst_point=label,
                               solve_seconds=elapsed)
  choice = ilp_reduce.expand(reduction, core.choice)
  return Solution(choice, problem.objective(choice), core.status,
                  core.num_variables, core.num_constraints, elapsed,
                  core.tied_nodes)


def _solve_fixed(problem: Problem) -> Solution | Infeasible | None:
  """A problem in which no node has a choice: its one assignment, checked
  against the budget (a solver given no variable may report the model
  invalid rather than solve it). None where some node has a choice."""
  if any(len(costs) > 1 for costs in problem.node_costs):
    return None
  choice = (0,) * len(problem.node_costs)
  if problem.memory_ok(choice):
    return Solution(choice, problem.objective(choice), "OPTIMAL", 0, 0, 0.0)
  need, label = min_memory_needed(problem)
  return Infeasible("INFEASIBLE", need, problem.memory_budget, label, 0, 0, 0.0)


def _solve_core(problem: Problem) -> Solution | Infeasible:
  """LP relaxation first (HiGHS); the MIP only where the LP leaves a gap.

  These ILPs usually have an integral LP optimum, which is then an ILP
  optimum too (the LP bounds the ILP from below). Otherwise the rounded LP
  solution is kept as a fallback while CBC searches under the time limit.
  """
  t0 = time.perf_counter()
  lp = _solve_mip(problem, relax=True)
  if isinstance(lp, Solution):
    if problem.memory_ok(lp.choice):
      rounded = problem.objective(lp.choice)
      if rounded <= lp.objective + 1e-9 * max(1.0, abs(lp.objective)):
        return dataclasses.replace(lp, objective=rounded, status="OPTIMAL",
                                   solve_seconds=time.perf_counter() - t0)
  elif problem.memory_budget is not None:
    return lp  # even the relaxation is infeasible: so is the ILP
  remaining = max(1.0, problem.time_limit_s - (time.perf_counter() - t0))
  mip = _solve_mip(dataclasses.replace(problem, time_limit_s=remaining),
                   relax=False)
  if isinstance(mip, Infeasible) and isinstance(lp, Solution) and \
      problem.memory_ok(lp.choice) and mip.status.startswith("NOT_SOLVED"):
    return dataclasses.replace(lp, objective=problem.objective(lp.choice),
                               status="FEASIBLE")
  return mip


def _solve_mip(problem: Problem, relax: bool) -> Solution | Infeasible:
  """Solves the model with the first backend that works: a MIP backend, or
  an LP backend on the relaxation.

  Raises:
    RuntimeError: every backend failed (each one's failure is named).
  """
  t0 = time.perf_counter()
  names = _usable_backends(LP_BACKENDS if relax else MIP_BACKENDS)
  failures = []
  for k, name in enumerate(names):
    left = problem.time_limit_s - (time.perf_counter() - t0)
    if failures and left < _MIN_FALLBACK_SECONDS:
      failures.append((name, f"not tried: {left:.1f}s of the time limit left"))
      break
    result = _solve_with(name, dataclasses.replace(
        problem, time_limit_s=min(problem.time_limit_s, left)), relax)
    if not isinstance(result, _Failure):
      return dataclasses.replace(result,
                                 solve_seconds=time.perf_counter() - t0)
    failures.append((name, result.reason))
    if k + 1 < len(names):
      warnings.warn(f"OR-Tools backend {name} {result.reason}; solving the "
                    f"sharding ILP with {names[k + 1]} instead",
                    SolverFallbackWarning, stacklevel=2)
  tried = "; ".join(f"{n} {why}" for n, why in failures)
  raise RuntimeError(f"no OR-Tools backend solved the sharding ILP ({tried}); "
                     "check the OR-Tools installation (pip install -U ortools)")


def _usable_backends(names: tuple[str, ...]) -> list[str]:
  """``names`` less the backends that would crash this process."""
  usable = [n for n in names
            if not _loaded_before_ortools(_CRASH_IF_LOADED_FIRST.get(n))]
  for name in names:
    if name in usable or not usable:
      continue
    module = _CRASH_IF_LOADED_FIRST[name]
    # (Python's warning filter shows it once per process by default)
    warnings.warn(f"{module} was imported before OR-Tools, and OR-Tools' "
                  f"{name} backend crashes the process in that order; the "
                  f"sharding ILP is solved with {usable[0]} instead (slower). "
                  f"Import alpa_py before {module} to use {name}.",
                  SolverFallbackWarning, stacklevel=3)
  return usable or list(names)


def _loaded_before_ortools(module: str | None) -> bool:
  """Whether ``module`` was imported before OR-Tools' solver module
  (``sys.modules`` keeps the order in which imports began)."""
  if module is None or module not in sys.modules:
    return False
  order = {name: i for i, name in enumerate(sys.modules)}
  return order[module] < order.get(pywraplp.__name__, len(order))


@dataclasses.dataclass(frozen=True)
class _Failure:
  """A backend that did not solve the problem (not a property of it)."""

  reason: str


# Statuses that answer the problem; any other says the backend failed (or,
# at the time limit, that it found no plan in time)
_ANSWERS = (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE,
            pywraplp.Solver.INFEASIBLE, pywraplp.Solver.UNBOUNDED)
_ERROR_STATUSES = {pywraplp.Solver.ABNORMAL: "ABNORMAL",
                   pywraplp.Solver.MODEL_INVALID: "MODEL_INVALID",
                   pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED"}


def _create_solver(name: str):
  """``pywraplp.Solver.CreateSolver`` (None where the build lacks ``name``)."""
  return pywraplp.Solver.CreateSolver(name)


def _solve_with(name: str, problem: Problem,
                relax: bool) -> Solution | Infeasible | _Failure:
  """Builds the model for backend ``name`` and solves it."""
  t0 = time.perf_counter()
  try:
    solver = _create_solver(name)
  except Exception as e:  # noqa: BLE001 - the backend's own error: try the next
    return _Failure(f"could not be created ({type(e).__name__}: {e})")
  if solver is None:
    return _Failure("is not available in this OR-Tools build")
  solver.SuppressOutput()
  solver.SetTimeLimit(int(problem.time_limit_s * 1000))
  infinity = solver.infinity()
  objective = solver.Objective()
  x: list[list] = []
  constant = 0.0
  for n, costs in enumerate(problem.node_costs):
    if len(costs) == 1:
      x.append([1.0])
      constant += costs[0]
      continue
    row = [solver.NumVar(0, 1, f"x{n}_{s}") if relax else
           solver.BoolVar(f"x{n}_{s}") for s in range(len(costs))]
    ct = solver.Constraint(1, 1)
    for var, c in zip(row, costs):
      ct.SetCoefficient(var, 1)
      objective.SetCoefficient(var, float(c))
    x.append(row)

  for k, e in enumerate(problem.edges):
    nu, nv = len(e.cost), len(e.cost[0])
    if nu == 1 or nv == 1:
      # one side has one class: the cost is linear in the other side's x
      _add_linear_edge(problem, e, x, objective)
      continue
    evars = [[solver.NumVar(0, 1, f"e{k}_{a}_{b}") for b in range(nv)]
             for a in range(nu)]
    for a in range(nu):
      ct = solver.Constraint(0, 0)
      for b in range(nv):
        ct.SetCoefficient(evars[a][b], 1)
        if e.cost[a][b]:
          objective.SetCoefficient(evars[a][b], float(e.cost[a][b]))
      for s, cls in enumerate(e.u_class):
        if cls == a:
          _coef(ct, x[e.u][s], -1)
    for b in range(nv):
      ct = solver.Constraint(0, 0)
      for a in range(nu):
        ct.SetCoefficient(evars[a][b], 1)
      for t, cls in enumerate(e.v_class):
        if cls == b:
          _coef(ct, x[e.v][t], -1)

  if problem.memory_budget is not None:
    for m in problem.memory:
      fixed = m.fixed_bytes + sum(b[0] for _, b in m.terms if len(b) == 1)
      chosen = [(n, b) for n, b in m.terms if len(b) > 1]
      if not chosen:
        # no choice changes this point: it holds or nothing does (a solver
        # handed a constraint without variables may call the model invalid)
        if fixed > problem.memory_budget:
          need, label = min_memory_needed(problem)
          return Infeasible("INFEASIBLE", need, problem.memory_budget, label,
                            0, 0, time.perf_counter() - t0)
        continue
      ct = solver.Constraint(-infinity, float(problem.memory_budget) - fixed)
      for n, b in chosen:
        for s, val in enumerate(b):
          if val:
            ct.SetCoefficient(x[n][s], float(val))
  objective.SetOffset(objective.offset() + constant)
  objective.SetMinimization()
  num_vars, num_cons = solver.NumVariables(), solver.NumConstraints()
  try:
    with _quiet_stdout():
      status = solver.Solve()
  except Exception as e:  # noqa: BLE001 - the backend's own error: try the next
    return _Failure(f"raised {type(e).__name__}: {e}")
  elapsed = time.perf_counter() - t0
  timed_out = elapsed >= 0.95 * problem.time_limit_s
  if status not in _ANSWERS:
    if not timed_out:
      return _Failure(f"returned {_ERROR_STATUSES.get(status, status)} "
                      f"after {elapsed:.2f}s")
    # stopped by the time limit before any plan, whatever the backend calls
    # it (HiGHS' MIP returns UNKNOWN, 99)
    status = pywraplp.Solver.NOT_SOLVED
  if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
    need, label = min_memory_needed(problem)
    names = {pywraplp.Solver.INFEASIBLE: "INFEASIBLE",
             pywraplp.Solver.NOT_SOLVED: "NOT_SOLVED (time limit)",
             pywraplp.Solver.UNBOUNDED: "UNBOUNDED"}
    return Infeasible(names.get(status, str(status)), need,
                      problem.memory_budget, label, num_vars, num_cons, elapsed)
  choice = []
  for row in x:
    if len(row) == 1 and isinstance(row[0], float):
      choice.append(0)
    else:
      choice.append(int(np.argmax([v.solution_value() for v in row])))
  choice = tuple(choice)
  if relax:
    return Solution(choice, objective.Value(), "LP", num_vars, num_cons, elapsed)
  return Solution(choice, problem.objective(choice),
                  "OPTIMAL" if status == pywraplp.Solver.OPTIMAL else "FEASIBLE",
                  num_vars, num_cons, elapsed)


@contextlib.contextmanager
def _quiet_stdout():
  """Silences the solver's C-level banner (HiGHS prints it on stdout)."""
  libc = ctypes.CDLL(None)
  try:
    sys.stdout.flush()
    saved = os.dup(1)
  except (OSError, ValueError):  # no real stdout (e.g. captured): nothing to do
    yield
    return
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 1)
      try:
        yield
      finally:
        libc.fflush(None)
        os.dup2(saved, 1)
  finally:
    os.close(saved)


def _coef(ct, var, c):
  if isinstance(var, float):  # a fixed node: move to the bound
    lb, ub = ct.lb(), ct.ub()
    ct.SetBounds(lb - c * var, ub - c * var)
  else:
    ct.SetCoefficient(var, c)


def _add_linear_edge(problem, e: Edge, x, objective):
  """Edge cost when one side has a single class: add it to the other's x."""
  if len(e.cost) == 1:
    for t, b in enumerate(e.v_class):
      _obj(objective, x[e.v][t], e.cost[0][b])
  else:
    for s, a in enumerate(e.u_class):
      _obj(objective, x[e.u][s], e.cost[a][0])


def _obj(objective, var, c):
  if not c:
    return
  if isinstance(var, float):  # a fixed node: a constant term
    objective.SetOffset(objective.offset() + float(c))
    return
  objective.SetCoefficient(var, objective.GetCoefficient(var) + float(c))


def solve_brute_force(problem: Problem) -> tuple[tuple[int, ...], float] | None:
  """Exhaustive search (for tests on small problems)."""
  best = None
  for choice in itertools.product(*[range(len(c)) for c in problem.node_costs]):
    if not problem.memory_ok(choice):
      continue
    obj = problem.objective(choice)
    if best is None or obj < best[1] - 1e-12:
      best = (choice, obj)
  return best
