"""JellyBean's heuristic, rewritten here (see the package doc and
docs/research/jellybean_optimizer.md): threshold-meeting variant
combinations ranked by summed relative cost, then a greedy multi-tier
worker assignment along topological orders."""

from __future__ import annotations

import math
import time

from alpa_py.serve.planner.problem import (GB_PER_HOUR, Plan, PlanError,
                                           Problem, plan_costs)


def _topological_orders(problem, limit):
  preds = {n: set(problem.preds(n)) for n in problem.nodes}
  out = []

  def walk(order, left):
    if len(out) >= limit:
      return
    if not left:
      out.append(list(order))
      return
    for n in sorted(left):
      if preds[n] <= set(order):
        walk(order + [n], left - {n})

  walk([], set(problem.nodes))
  return out


def _greedy_assignment(problem, model, order, best_k):
  """JellyBean's multiple-tier greedy worker assignment along one
  topological order; up to ``best_k`` states ``(search cost, compute,
  tiers, rates)``."""
  tier, price, ntiers = problem.tiers, problem.worker_price, \
      1 + max(problem.tiers.values())
  need = problem.required_rates()

  def tp(v, w):
    return problem.throughput(v, w, model.get(v, "default"))

  def msg(u, v):
    return problem.message(u, v, model.get(u, "default"),
                           model.get(v, "default"))

  def link_cost(st, v, w, source_rate, share):
    """Communication into ``w`` for operator ``v``: a source input at
    ``source_rate`` items/s; another input's full flow times ``share``."""
    c = 0.0
    for u in problem.preds(v):
      if u in problem.source_rates:
        c += problem.source_link.get((u, w), 0.0) * source_rate * msg(u, v)
      else:
        flow = need[v] * msg(u, v)
        for a, ra in st["rates"][u]:
          c += (problem.worker_link.get((a, w), 0.0) * ra * flow / need[u] *
                share)
    return c * GB_PER_HOUR

  states = [dict(search=0.0, compute=0.0, tiers={}, rates={}, used=set())]
  for v in order:
    if v in problem.source_rates:
      for st in states:
        st["tiers"][v] = -1
      continue
    want = need[v]
    new = []
    for st in states:
      lo = max(0, max(st["tiers"][u] for u in problem.preds(v)))
      for hi in range(lo, ntiers):
        avail = [w for w in problem.workers if lo <= tier[w] <= hi and
                 w not in st["used"] and tp(v, w) is not None]
        low = min((tier[w] for w in avail), default=0)
        sat = [w for w in avail if tier[w] == low and tp(v, w) >= want]
        if sat:
          ranked = sorted(sat, key=lambda w: (
              price[w] + link_cost(st, v, w, want, 1.0), tp(v, w)))
        else:
          # per-item cost (price + traffic at full throughput), then cost
          cost = {w: price[w] + link_cost(st, v, w, tp(v, w), tp(v, w) / want)
                  for w in avail}
          ranked = sorted(avail, key=lambda w: (cost[w] / tp(v, w), cost[w]))
        got, picked = 0.0, []
        while got < want and ranked:
          w = ranked.pop(0)
          r = want - got if got + tp(v, w) > want else tp(v, w)
          picked.append((w, r))
          got += r
          if got < want and ranked:
            low = min(tier[x] for x in ranked)
            sat = [x for x in ranked if tier[x] == low and
                   tp(v, x) > want - got]
            if sat:
              left = want - got
              ranked = sorted(sat, key=lambda x: (
                  price[x] + link_cost(st, v, x, left, 1.0), tp(v, x)))
        if got < want:
          continue
        compute = sum(price[w] for w, _ in picked)
        comm = 0.0
        for u in problem.preds(v):
          flow = want * msg(u, v)
          if u in problem.source_rates:
            for w, r in picked:
              comm += problem.source_link.get((u, w), 0.0) * r * msg(u, v)
          else:
            for a, ra in st["rates"][u]:
              for w, r in picked:
                comm += (problem.worker_link.get((a, w), 0.0) *
                         (ra * flow / need[u]) * (r / want))
        rates = dict(st["rates"])
        rates[v] = picked
        tiers = dict(st["tiers"])
        tiers[v] = max(tier[w] for w, _ in picked)
        new.append(dict(search=st["search"] + compute + comm * GB_PER_HOUR,
                        compute=st["compute"] + compute, tiers=tiers,
                        rates=rates,
                        used=st["used"] | {w for w, _ in picked}))
    new.sort(key=lambda s: s["search"])
    states = new[:best_k]
  return states


def jellybean_plan(problem: Problem, *, beam_width: int = 10,
                   max_orders: int = 10, best_k: int = 10) -> Plan:
  """JellyBean's heuristic (see the module doc); raises PlanError when
  it finds no assignment."""
  t0 = time.perf_counter()
  combos = problem.feasible_combinations()
  ops = problem.accuracy_ops

  def rank(combo):
    cost = sum(problem.variant_cost.get(o, {}).get(var, 0.0)
               for o, var in zip(ops, combo))
    return (cost, -problem.accuracy[combo])

  combos = sorted(combos, key=rank)[:beam_width]
  orders = _topological_orders(problem, max_orders)
  best = None
  for combo in combos:
    model = dict(zip(ops, combo))
    for op in problem.operators:
      if op not in model:
        if len(problem.variants[op]) != 1:
          raise PlanError(f"the heuristic needs {op!r} in the accuracy "
                          f"table or with one variant; it has "
                          f"{problem.variants[op]}")
        model[op] = problem.variants[op][0]
    found = []
    for order in orders:
      found += _greedy_assignment(problem, model, order, best_k)
      found.sort(key=lambda s: s["search"])
      found = found[:best_k]
    acc = problem.accuracy[combo]
    for st in found:
      _, comm = plan_costs(problem, model, st["rates"])
      total = st["compute"] + comm
      if best is None or total < best[0] or (
          math.isclose(total, best[0], rel_tol=1e-9) and acc > best[1]):
        best = (total, acc, st["compute"], comm, model, st["rates"])
  if best is None or not math.isfinite(best[0]):
    raise PlanError("the JellyBean heuristic found no worker assignment "
                    "meeting the rates")
  total, acc, compute, _, model, rates = best
  return Plan(compute_cost=compute, communication_cost=total - compute,
              end_to_end_accuracy=acc, model_assignment=model,
              worker_rates={op: list(rates[op]) for op in problem.operators},
              method="jellybean", solve_seconds=time.perf_counter() - t0)
