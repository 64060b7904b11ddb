"""The exact planner: one MILP (OR-Tools, SCIP) over variants, workers and
rates (see the package doc)."""

from __future__ import annotations

import time

from alpa_py.serve.planner.problem import (GB_PER_HOUR, Plan, PlanError,
                                           Problem, check, plan_costs)


def _edge_classes(problem, u, v, cand):
  """Sender and receiver classes of the edge ``u -> v`` (workers with the
  same link prices to, and from, every candidate of the other side),
  the per-pair price matrix (0 within a tier) and the pairs that send to a
  lower tier."""
  tier = problem.tiers
  su, sv = cand[u], cand[v]

  def price(a, b):
    return problem.worker_link.get((a, b), 0.0) if tier[b] > tier[a] else 0.0

  rows, cols = {}, {}
  for a in su:
    rows.setdefault(tuple(price(a, b) for b in sv), []).append(a)
  for b in sv:
    cols.setdefault(tuple(price(a, b) for a in su), []).append(b)
  pairs = []
  for S in rows.values():
    for T in cols.values():
      c = price(S[0], T[0])
      if c > 0:
        pairs.append((S, T, c))
  backward = [(a, b) for a in su for b in sv if tier[b] < tier[a]]
  return pairs, backward


def optimal_plan(problem: Problem, *, time_limit: float = 10.0,
                 rate_bits: int = 16, mip_gap: float = 1e-7,
                 solver_name: str = "SCIP") -> Plan:
  """The MILP planner (see the module doc). ``time_limit`` in seconds
  (the best plan found by then is returned, with its gap); ``mip_gap``:
  the relative gap at which the solver stops. Raises PlanError when the
  objectives cannot be met jointly or when the limit passes with no
  feasible plan found."""
  from ortools.linear_solver import pywraplp

  t0 = time.perf_counter()
  if not time_limit > 0:
    raise PlanError(f"time_limit (={time_limit}) must be > 0 seconds")
  if not 1 <= rate_bits <= 30:
    raise PlanError(f"rate_bits (={rate_bits}) must lie in [1, 30]")
  check(problem)
  solver = pywraplp.Solver.CreateSolver(solver_name)
  if solver is None:
    raise PlanError(f"OR-Tools has no {solver_name} solver in this build")
  rates = problem.required_rates()
  ops = problem.operators
  cand = {op: [w for w in problem.workers
               if any(problem.throughput(op, w, var) is not None
                      for var in problem.variants[op])] for op in ops}
  x = {(op, w): solver.BoolVar(f"x[{op},{w}]") for op in ops for w in cand[op]}
  z = {(op, var): solver.BoolVar(f"z[{op},{var}]") for op in ops
       for var in problem.variants[op]}
  r = {}
  for op in ops:
    for w in cand[op]:
      for var in problem.variants[op]:
        tp = problem.throughput(op, w, var)
        if tp is not None:
          r[(op, w, var)] = solver.NumVar(0.0, tp, f"r[{op},{w},{var}]")
  # variants: one combination of the accuracy table that meets the
  # threshold; operators outside the table choose freely
  combos = problem.feasible_combinations()
  y = [solver.BoolVar(f"y{i}") for i in range(len(combos))]
  solver.Add(solver.Sum(y) == 1)
  for op in ops:
    if op in problem.accuracy_ops:
      i = problem.accuracy_ops.index(op)
      for var in problem.variants[op]:
        solver.Add(z[(op, var)] == solver.Sum(
            [yc for yc, c in zip(y, combos) if c[i] == var]))
    else:
      solver.Add(solver.Sum([z[(op, var)] for var in problem.variants[op]])
                 == 1)
  for w in problem.workers:
    mine = [x[(op, w)] for op in ops if (op, w) in x]
    if len(mine) > 1:
      solver.Add(solver.Sum(mine) <= 1)  # one operator per worker
  for op in ops:
    for w in cand[op]:
      load = [r[(op, w, var)] * (1.0 / problem.throughput(op, w, var))
              for var in problem.variants[op] if (op, w, var) in r]
      solver.Add(solver.Sum(load) <= x[(op, w)])
    for (o, w, var), rv in r.items():
      if o == op:
        solver.Add(rv <= problem.throughput(op, w, var) * z[(op, var)])
    solver.Add(solver.Sum([rv for (o, _, _), rv in r.items() if o == op])
               == rates[op])
  compute = solver.Sum([problem.worker_price[w] * xv
                        for (_, w), xv in x.items()])
  comm_terms, slack = [], 0.0
  for u, v in problem.edges:
    if u in problem.source_rates:
      for (o, w, var), rv in r.items():
        if o == v and problem.tiers[w] > 0:
          c = problem.source_link.get((u, w), 0.0)
          if c > 0:
            comm_terms.append(c * GB_PER_HOUR *
                              problem.message(u, v, "default", var) * rv)
      continue
    pairs, backward = _edge_classes(problem, u, v, cand)
    for a, b in backward:  # no traffic to a lower tier
      solver.Add(x[(u, a)] + x[(v, b)] <= 1)
    mmax = max(problem.message(u, v, uv, vv) for uv in problem.variants[u]
               for vv in problem.variants[v])
    a_max = rates[u] * mmax
    for S, T, c in pairs:
      for vv in problem.variants[v]:
        recv = [r[(v, b, vv)] for b in T if (v, b, vv) in r]
        send = [r[(u, a, uv)] * problem.message(u, v, uv, vv)
                for a in S for uv in problem.variants[u] if (u, a, uv) in r]
        if not recv or not send:
          continue
        b_max = min(rates[v], sum(problem.throughput(v, b, vv) or 0.0
                                  for b in T))
        step = b_max / (2 ** rate_bits - 1)
        bits = [solver.BoolVar(f"beta[{u},{v},{vv},{T[0]},{k}]")
                for k in range(rate_bits)]
        # receivers' rate rounded up onto the grid of ``step``
        solver.Add(solver.Sum(recv) <=
                   solver.Sum([step * 2 ** k * bk for k, bk in
                               enumerate(bits)]))
        sent = solver.Sum(send)
        prods = []
        for k, bk in enumerate(bits):
          pk = solver.NumVar(0.0, a_max, f"p[{u},{v},{vv},{T[0]},{k}]")
          solver.Add(pk >= sent - a_max * (1 - bk))  # pk >= sent * bk
          prods.append(step * 2 ** k * pk)
        scale = c * GB_PER_HOUR / rates[u]
        comm_terms.append(scale * solver.Sum(prods))
        slack += scale * a_max * step
  comm = solver.Sum(comm_terms) if comm_terms else 0.0
  solver.Minimize(compute + comm)
  solver.SetTimeLimit(max(1, int(1000 * time_limit)))
  params = pywraplp.MPSolverParameters()
  params.SetDoubleParam(params.RELATIVE_MIP_GAP, mip_gap)
  status = solver.Solve(params)
  if status == pywraplp.Solver.INFEASIBLE:
    raise PlanError("no plan meets every operator's rate with one operator "
                    "per worker (the workers cannot carry the rates "
                    "jointly, or only by sending to a lower tier)")
  if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
    raise PlanError(f"the time limit ({time_limit} s) passed with no "
                    f"feasible plan found (solver status {status})")
  model = {op: next(var for var in problem.variants[op]
                    if z[(op, var)].solution_value() > 0.5) for op in ops}
  worker_rates = {}
  for op in ops:
    got = [(w, sum(rv.solution_value() for (o, ww, _), rv in r.items()
                   if o == op and ww == w))
           for w in cand[op] if x[(op, w)].solution_value() > 0.5]
    worker_rates[op] = sorted(got, key=lambda t: -t[1])
  cost_compute, cost_comm = plan_costs(problem, model, worker_rates)
  total = cost_compute + cost_comm
  bound = solver.Objective().BestBound() - slack
  gap = max(0.0, (total - bound) / total) if total > 0 else 0.0
  return Plan(compute_cost=cost_compute, communication_cost=cost_comm,
              end_to_end_accuracy=problem.accuracy_of(model),
              model_assignment=model, worker_rates=worker_rates,
              method=f"milp ({solver_name})", optimality_gap=gap,
              solve_seconds=time.perf_counter() - t0)
