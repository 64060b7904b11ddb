"""The serving planner on our own multi-LoRA fleet: the cheapest plan that
meets a throughput and a time-per-token SLO, beside "largest variant
everywhere" and "cheapest tier only", each plan checked in the serving
simulator.

  1. Accuracy proxies: the adapters of ``examples/multi_lora_finetune.py``
     (8 adapters, rank 8) fine-tuned ``--steps`` steps, then held-out
     next-token accuracy of each serving variant the engine runs
     (``alpa_py.serve.variants``): adapter 0 (the hot one) merged into the
     base, and every adapter truncated by SVD to rank 8 (full), 4, 2. The
     fleet serves LLaMA-7B shapes with rank-16 adapters; rank fractions
     carry over (example rank 8/4/2 stands for 16/8/4).
  2. Fleet inputs in JellyBean's format (``planner.fleet``): 4,096 output
     tokens/s, the hot adapter 38% of them (Zipf 1.5), 63 other adapters,
     prompts and outputs of 256 tokens, SLO 80 ms per output token,
     devices of gpu_prices.csv with published peaks; accuracy threshold:
     the full-rank traffic-weighted accuracy minus ``--slack`` points.
  3. Plans (the MILP for each): free; "largest variant everywhere"
     (full-rank unmerged adapters for all traffic, devices still chosen);
     "cheapest tier only" (only the cheapest device type that meets the
     SLO, any variant); and JellyBean's heuristic on the free problem.
  4. Every planned worker simulated alone (``serve.simulator``) at its
     assigned rate: p99 time per output token and output tokens/s.

  python benchmarks/lora_fleet_plan.py [--json benchmarks/results/lora_fleet_plan.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

from alpa_py.serve import planner  # noqa: E402
from alpa_py.serve.planner import fleet  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = {"lora-r16": 8, "lora-r8": 4, "lora-r4": 2}  # fleet name -> example


def accuracy_proxies(steps, batches=8):
  """``{(operator, variant): held-out next-token accuracy in %}``."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.join(HERE, "..", "examples"))
  import multi_lora_finetune as ex
  from alpa_py.models import GPT
  from alpa_py.serve import variants

  *_, state = ex.train(steps, verbose=False)
  cfg, params = ex.config(), jax.device_get(state.params)

  def per_adapter(cfg, params, hot_as=None):
    hits = []
    for k in range(batches):
      data = ex.task_batch(jax.random.PRNGKey(10_000 + k), 64, 16, 64)
      ids = np.asarray(data["adapter"])
      run = ids if hot_as is None else np.where(ids == 0, hot_as, ids)
      logits = GPT(cfg).apply(params, data["tokens"], jnp.asarray(run))
      pred = np.asarray(logits[:, :-1].argmax(-1))
      hits.append((ids, (pred == np.asarray(data["tokens"][:, 1:])).mean(1)))
    ids = np.concatenate([h[0] for h in hits])
    acc = np.concatenate([h[1] for h in hits])
    return [100 * acc[ids == a].mean() for a in range(ex.NUM_ADAPTERS)]

  out = {}
  for name, rank in RANKS.items():
    p, c = variants.truncate_rank(params, cfg, rank)
    acc = per_adapter(c, p)
    out[("HotAdapter", name)] = acc[0]
    out[("OtherAdapters", name)] = float(np.mean(acc[1:]))
  merged = variants.merge_adapter(params, cfg, 0)
  out[("HotAdapter", "merged")] = per_adapter(cfg, merged, hot_as=-1)[0]
  return out


def check_plan(plan, profiles, work, slo_s):
  rows = []
  seen = {}
  for op, ws in plan.worker_rates.items():
    var = plan.model_assignment[op]
    for w, rate in ws:
      dev = w.split("#")[0]
      key = (op, dev, var, round(rate, 1))
      if key not in seen and rate > 0:
        seen[key] = fleet.simulate_worker(profiles[(op, dev, var)], op, var, rate,
                                    work)
      if rate > 0:
        rows.append(dict(operator=op, worker=w, variant=var, rate=rate,
                         **seen[key]))
  worst = max(r["p99_tpot_ms"] for r in rows)
  return dict(workers=rows, worst_p99_tpot_ms=worst,
              meets_slo=worst <= 1e3 * slo_s)


def _plans(problem, profiles, work, slo):
  """The free plan and the baselines, each checked in the simulator."""
  prices = fleet.read_gpu_prices()
  devices = [d for d in fleet.DEVICE_PEAKS if any(k[1] == d
                                                 for k in profiles)]
  cheapest = min(devices, key=lambda d: prices[d][0])
  largest = max(devices, key=lambda d: prices[d][0])

  def only(device):
    return [w for w in problem.workers if w.startswith(device + "#")]

  full = [("lora-r16", "lora-r16")]
  cases = {
      "planner (MILP)": problem,
      "largest variant everywhere": planner.restrict(problem,
                                                     combinations=full),
      f"cheapest tier only ({cheapest})": planner.restrict(
          problem, workers=only(cheapest)),
      f"largest variant on {largest} only": planner.restrict(
          problem, combinations=full, workers=only(largest)),
  }
  plans = [(name, planner.optimal_plan(prob, time_limit=60.0))
           for name, prob in cases.items()]
  try:
    plans.append(("JellyBean heuristic", planner.jellybean_plan(problem)))
  except planner.PlanError as e:
    print(f"JellyBean heuristic: {e}")
  base = plans[1][1].total_cost
  rows = []
  for name, plan in plans:
    devs = {}
    for ws in plan.worker_rates.values():
      for w, _ in ws:
        devs[w.split("#")[0]] = devs.get(w.split("#")[0], 0) + 1
    rows.append(dict(plan=name, cost_per_hour=plan.total_cost,
                     ratio_to_largest=plan.total_cost / base,
                     accuracy=plan.end_to_end_accuracy,
                     variants=plan.model_assignment, devices=devs,
                     gap=plan.optimality_gap, solve_seconds=plan.solve_seconds,
                     simulated=check_plan(plan, profiles, work, slo)))
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default=None)
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--slo-ms", type=float, default=80.0)
  ap.add_argument("--slack", type=float, nargs="+", default=[1.0, 15.0],
                  help="accuracy points below full rank allowed (one table "
                  "each)")
  ap.add_argument("--inputs", default=os.path.join(HERE, "results",
                                                   "lora_fleet_inputs"))
  args = ap.parse_args(argv)
  t0 = time.time()
  acc = accuracy_proxies(args.steps)
  print("held-out next-token accuracy (%) per variant:")
  for (op, var), a in sorted(acc.items()):
    print(f"  {op:>13} {var:>9}: {a:6.2f}")
  work = fleet.LoraWorkload()
  full = (work.hot_share * acc[("HotAdapter", "lora-r16")] +
          (1 - work.hot_share) * acc[("OtherAdapters", "lora-r16")])
  slo = args.slo_ms / 1e3
  tables = []
  for slack in args.slack:
    threshold = full - slack
    folder = f"{args.inputs}_slack{slack:g}"
    profiles = fleet.write_lora_fleet(folder, acc, work, slo_tpot_s=slo,
                                      threshold=threshold)
    problem = planner.load_jellybean(folder, comm_scale=1.0)
    rows = _plans(problem, profiles, work, slo)
    print(f"\n{work.output_tokens_per_s:g} output tokens/s, SLO "
          f"{args.slo_ms:g} ms per output token, accuracy >= "
          f"{threshold:.2f} (full rank {full:.2f} - {slack:g}); inputs in "
          f"{os.path.relpath(folder)}")
    print(f"{'plan':>36} {'$/h':>8} {'vs largest':>10} {'acc':>6} "
          f"{'variants':>22} {'devices':>26} {'sim p99 ms':>10}")
    for r in rows:
      dev_text = ", ".join(f"{n} {d}" for d, n in sorted(r["devices"].items()))
      var_text = "/".join(r["variants"][o]
                          for o in ("HotAdapter", "OtherAdapters"))
      print(f"{r['plan']:>36} {r['cost_per_hour']:8.3f} "
            f"{r['ratio_to_largest']:10.3f} {r['accuracy']:6.2f} "
            f"{var_text:>22} {dev_text:>26} "
            f"{r['simulated']['worst_p99_tpot_ms']:10.1f}")
    tables.append(dict(slack=slack, threshold=threshold, plans=rows))
  print(f"\n{time.time() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(accuracy={f"{o}/{v}": a for (o, v), a in acc.items()},
                     full_rank_accuracy=full, slo_ms=args.slo_ms,
                     workload=dataclasses.asdict(work), tables=tables),
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
