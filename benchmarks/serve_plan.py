"""Serving planner: JellyBean's heuristic against the exact MILP, side by
side in one run.

  vqa: JellyBean's VQA example inputs (embedded in alpa_py/serve/data) at
    link-price scaling factors 0.1 (its published setting), 0.3 and 1.0:
    total cost ($/h) of each planner, their ratio, the MILP's gap and solve
    time. At 0.1 the heuristic must give JellyBean's published
    6.242 + 1.2668.
  fleet: the VQA workflow on larger fleets: each worker copied k times
    (prices and latencies jittered by up to +-20%, seeded; link prices as
    the original's by tier) with the injection rates scaled by k.

  python benchmarks/serve_plan.py [--json benchmarks/results/serve_plan.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from alpa_py.serve import planner as pl


def replicate(problem, copies, seed=0, jitter=0.2):
  """``problem`` with every worker copied ``copies`` times (prices and
  latencies times 1 +- ``jitter``), links as the originals', injection
  rates times ``copies``."""
  rng = np.random.default_rng(seed)
  name = {w: [f"{w}#{i}" for i in range(copies)] for w in problem.workers}
  price, tiers, latency = {}, {}, {}
  for w, p in problem.worker_price.items():
    for c in name[w]:
      price[c] = p * (1 + jitter * rng.uniform(-1, 1))
      tiers[c] = problem.tiers[w]
      speed = 1 + jitter * rng.uniform(-1, 1)
      for (op, ww, var), ms in problem.latency_ms.items():
        if ww == w:
          latency[(op, c, var)] = ms * speed
  worker_link = {(ca, cb): v for (a, b), v in problem.worker_link.items()
                 for ca in name[a] for cb in name[b]}
  source_link = {(s, c): v for (s, w), v in problem.source_link.items()
                 for c in name[w]}
  return dataclasses.replace(
      problem, worker_price=price, tiers=tiers, latency_ms=latency,
      worker_link=worker_link, source_link=source_link,
      source_rates={s: r * copies for s, r in problem.source_rates.items()})


def _row(name, problem, time_limit):
  t0 = time.perf_counter()
  try:
    heur = pl.jellybean_plan(problem)
  except pl.PlanError as e:
    heur = None
    print(f"  {name}: the heuristic found no plan ({e})")
  t_heur = time.perf_counter() - t0
  milp = pl.optimal_plan(problem, time_limit=time_limit)
  row = dict(instance=name, workers=len(problem.workers),
             milp_total=milp.total_cost, milp_compute=milp.compute_cost,
             milp_comm=milp.communication_cost,
             milp_gap=milp.optimality_gap, milp_seconds=milp.solve_seconds,
             milp_variants=milp.model_assignment,
             heuristic_seconds=t_heur)
  if heur is not None:
    row.update(heuristic_total=heur.total_cost,
               heuristic_compute=heur.compute_cost,
               heuristic_comm=heur.communication_cost,
               ratio=milp.total_cost / heur.total_cost)
  return row


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default=None)
  ap.add_argument("--time-limit", type=float, default=60.0)
  args = ap.parse_args(argv)
  rows = []
  for scale in (0.1, 0.3, 1.0):
    rows.append(_row(f"VQA, link scale {scale}",
                     pl.load_jellybean(pl.VQA_EXAMPLE, comm_scale=scale),
                     args.time_limit))
  base = pl.load_jellybean(pl.VQA_EXAMPLE)
  for copies in (2, 4, 8):
    for seed in (0, 1):
      rows.append(_row(f"VQA fleet x{copies} (seed {seed})",
                       replicate(base, copies, seed), args.time_limit))
  print(f"{'instance':>28} {'workers':>7} {'heuristic':>10} {'MILP':>10} "
        f"{'MILP/heur':>9} {'gap':>9} {'MILP s':>7} {'heur s':>7}")
  for r in rows:
    heur = r.get("heuristic_total")
    print(f"{r['instance']:>28} {r['workers']:7d} "
          f"{heur if heur is not None else float('nan'):10.4f} "
          f"{r['milp_total']:10.4f} {r.get('ratio', float('nan')):9.4f} "
          f"{r['milp_gap']:9.2e} {r['milp_seconds']:7.2f} "
          f"{r['heuristic_seconds']:7.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
