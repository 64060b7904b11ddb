"""Policies side by side on one trace (``alpa-py serve-sim``): the
saturating arrival rate is the cluster's capacity under the best policy
(every request offered at time 0; the requests finished per second until
the queue first empties, the highest any policy reaches), then every
policy serves the same trace (Poisson, or Gamma gaps with ``cv``) at that
rate and at half of it."""

from __future__ import annotations

import json
import os

from alpa_py.bench.progress import Bar
from alpa_py.serve import simulator, workloads
from alpa_py.serve.scheduler import POLICIES, get_policy


def compare(workload: str, gpus: int, policies=None, *, requests: int = 2000,
            seed: int = 0, model: simulator.StepTimeModel | None = None,
            cv: float = 1.0, progress: bool = True, **engine) -> dict:
  """Every policy on the same trace at the saturating rate and half of
  it; returns the rows and the rates."""
  if not isinstance(gpus, int) or gpus < 1:
    raise ValueError(f"gpus (={gpus!r}) must be an int >= 1")
  if not isinstance(requests, int) or requests < 1:
    raise ValueError(f"requests (={requests!r}) must be an int >= 1")
  if workload not in workloads.WORKLOADS:
    raise ValueError(f"unknown workload {workload!r}; choose one of "
                     f"{workloads.WORKLOADS}")
  model = model or simulator.StepTimeModel.roofline()
  policies = list(policies or POLICIES)
  for p in policies:
    get_policy(p)  # unknown names fail before any work
  bar = Bar(3 * len(policies), f"serve-sim {workload} on {gpus} GPUs",
            progress)
  offline = workloads.make_workload(workload, requests, None, seed)
  rates = {}
  for p in policies:
    r = simulator.simulate(offline, get_policy(p), gpus=gpus, model=model,
                           **engine)
    rates[p] = r["saturated_requests_per_s"] or requests / r["span_seconds"]
    bar.step(f"capacity {p}")
  best = max(rates, key=rates.get)
  capacity = rates[best]
  rows = []
  for label, rate in (("saturating", capacity), ("half", capacity / 2)):
    trace = workloads.make_workload(workload, requests, rate, seed, cv)
    for p in policies:
      row = simulator.simulate(trace, get_policy(p), gpus=gpus, model=model,
                               **engine)
      row.update(workload=workload, load=label, rate_requests_per_s=rate)
      rows.append(row)
      bar.step(f"{label} {p}")
  return dict(workload=workload, gpus=gpus, requests=requests, seed=seed,
              cv=cv, capacity_requests_per_s=capacity, capacity_policy=best,
              offline_requests_per_s=rates,
              step_time_model=model.source, rows=rows)


def table(result: dict) -> str:
  lines = [f"{result['workload']} on {result['gpus']} GPUs, "
           f"{result['requests']} requests; capacity "
           f"{result['capacity_requests_per_s']:.2f} req/s (offline, "
           f"{result['capacity_policy']})",
           f"{'load':<11}{'policy':<23}{'tokens/s':>10}{'out tok/s':>10}"
           f"{'steady':>9}{'p50 s/tok':>10}{'p99 s/tok':>10}{'GPU-s':>9}"
           f"{'preempt':>8}{'x punica':>9}{'steady x':>9}"]
  rows = result["rows"]
  punica = {x["load"]: x for x in rows if x["policy"] == "punica"}
  for r in rows:
    ref = punica.get(r["load"], r)
    lines.append(
        f"{r['load']:<11}{r['policy']:<23}{r['throughput_tokens_per_s']:10.0f}"
        f"{r['output_tokens_per_s']:10.0f}"
        f"{_num(r['steady_output_tokens_per_s'], 9, 0)}"
        f"{r['p50_seconds_per_output_token']:10.4f}"
        f"{r['p99_seconds_per_output_token']:10.4f}{r['gpu_seconds']:9.0f}"
        f"{r['preemptions']:8d}"
        f"{r['throughput_tokens_per_s'] / ref['throughput_tokens_per_s']:9.2f}"
        f"{_num(_ratio(r, ref, 'steady_output_tokens_per_s'), 9, 2)}")
  lines.append("tokens/s, out tok/s: over the whole run (drain included); "
               "steady: output tokens/s while requests arrive; x punica: "
               "a policy's figure / Punica's")
  lines.append(f"step-time model: {result['step_time_model']}")
  return "\n".join(lines)


def _ratio(r, ref, key):
  a, b = r.get(key), ref.get(key)
  return a / b if a is not None and b else None


def _num(v, width, digits) -> str:
  return f"{v:{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def plot(result: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  policies = list(dict.fromkeys(r["policy"] for r in rows))
  loads = list(dict.fromkeys(r["load"] for r in rows))
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  for ax, key, label in zip(axes, ("throughput_tokens_per_s",
                                   "p99_seconds_per_output_token",
                                   "gpu_seconds"),
                            ("tokens/s (prompt + output)",
                             "p99 seconds per output token", "GPU-seconds")):
    width = 0.8 / len(loads)
    for i, load in enumerate(loads):
      vals = [next(r[key] for r in rows if r["policy"] == p and
                   r["load"] == load) for p in policies]
      ax.bar([j + i * width for j in range(len(policies))], vals, width,
             label=f"{load} load")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(policies))])
    ax.set_xticklabels(policies, rotation=30, ha="right", fontsize=7)
    ax.set_title(label, fontsize=9)
    if key == "p99_seconds_per_output_token":
      ax.set_yscale("log")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{result['workload']} on {result['gpus']} GPUs", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def save(result: dict, out: str, plot_it: bool = True) -> list[str]:
  os.makedirs(out, exist_ok=True)
  stem = os.path.join(out, f"serve_sim_{result['workload']}_"
                      f"{result['gpus']}gpus")
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  paths = [stem + ".json"]
  if plot_it:
    paths.append(plot(result, stem + ".png"))
  return paths
