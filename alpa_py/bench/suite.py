"""Run one config's plans side by side: measured here and predicted under
cost profiles, with every figure in one JSON document."""

from __future__ import annotations

import json
import os
import statistics

import jax

import alpa_py
from alpa_py.bench import configs, plans
from alpa_py.bench.progress import Bar
from alpa_py.compiler.cluster_env import get_profile
from alpa_py.compiler.cost_features import FEATURES, program_features
from alpa_py.compiler.program_cost import price_program


def run_suite(suite: str, name: str, *, devices: int | None = None,
              steps: int = 5, profiles=("cpu", "a100_8x_nvlink_100gbps"),
              auto_profile: str = "cpu", progress: bool = True) -> dict:
  """Measures and predicts every plan of one config; returns the figures.

  Every plan is compiled first; then ``steps`` rounds time one step of each
  plan in turn (A B C ... A B C ..., after one warm-up step each), and a
  plan's measured time is the median of its rounds. The auto plan is
  planned under ``auto_profile``. Each plan has two predictions per
  profile: ``predicted`` (the ILP's objective on the traced graph, its
  input layouts fixed) and ``predicted_compiled`` (the profile's price of
  the program XLA compiled, ``program_cost.price_program``)."""
  cfg = configs.get_config(suite, name)
  devs = jax.devices()[:devices] if devices else jax.devices()
  n = len(devs)
  state = configs.make_state(cfg)
  batch = configs.make_batch(cfg)
  step = configs.make_step(cfg)
  methods = ["jit", "data", "zero2", "zero3", "auto"]
  manual = {p.name: p for p in plans.manual_plans(suite, n)}
  bar = Bar(len(methods) + len(manual) + 2, f"{suite}:{name}", progress)
  predictor = plans.Predictor(step, state, batch, n)
  bar.step("traced")
  flops = predictor.matmul_flops
  runners, pred = {}, {}
  for m in methods + list(manual):
    bar.step(m)
    if m == "jit":
      runners[m] = plans.prepare_single(step, state, batch)
    elif m in plans.METHODS:
      opt = alpa_py.AutoShardingOption(cost_profile=auto_profile)
      runners[m] = plans.prepare_method(
          step, state, batch, plans.METHODS[m](devices=devs,
                                               auto_sharding_option=opt))
    else:
      runners[m] = plans.prepare_manual(step, state, batch, manual[m], devs)
    used = 1 if m == "jit" else n
    pred[m] = {}
    for prof in profiles:
      sol = (predictor.manual(manual[m], prof) if m in manual
             else predictor.method(m, prof))
      pred[m][prof] = dict(step_seconds=sol.objective,
                           tflops_per_device=flops / sol.objective / used / 1e12,
                           mesh=list(sol.mesh_shape))
  bar.step(f"timing {steps} interleaved rounds")
  measured = plans.measure_interleaved(runners, steps)
  rows = []
  for m, r in runners.items():
    used = 1 if m == "jit" else n
    rows.append(dict(plan=m, devices=used,
                     measured_step_seconds=measured[m],
                     measured_tflops_per_device=flops / measured[m] / used / 1e12,
                     memory_per_device=r.memory_per_device,
                     collective_bytes=r.collective_bytes,
                     compile_seconds=r.compile_seconds, ilp=r.ilp,
                     # what a calibrated model prices (any later one can
                     # price the measured program from these)
                     program_features=dict(zip(
                         FEATURES, map(float, program_features(r.hlo_text)))),
                     predicted=pred[m],
                     predicted_compiled={
                         prof: dict(step_seconds=price_program(
                             r.hlo_text, get_profile(prof)).seconds)
                         for prof in profiles}))
  return dict(suite=suite, config=name, devices=n, params=configs.num_params(state),
              matmul_flops_per_step=flops, batch=cfg.batch, steps=steps,
              timing="median of interleaved rounds", profiles=list(profiles),
              auto_profile=auto_profile, rows=rows, checks=checks(rows, profiles))


def order_agreement(rows, profile: str, margin: float = 0.10,
                    key: str = "predicted"):
  """(agreeing, compared): over the multi-device plan pairs whose measured
  times differ by more than ``margin``, how many the profile orders the
  same way (``key``: ``predicted`` or ``predicted_compiled``)."""
  multi = [r for r in rows if r["plan"] != "jit"]
  agree = total = 0
  for i, a in enumerate(multi):
    for b in multi[i + 1:]:
      ma, mb = a["measured_step_seconds"], b["measured_step_seconds"]
      if max(ma, mb) <= (1 + margin) * min(ma, mb):
        continue
      total += 1
      pa = a[key][profile]["step_seconds"]
      pb = b[key][profile]["step_seconds"]
      agree += (pa < pb) == (ma < mb)
  return agree, total


def checks(rows, profiles) -> dict:
  """What the suite asserts about itself, on measured times: auto's time
  within 5% of the best baseline's and its memory at most data
  parallel's; and, per profile, how well predictions order and match the
  measurements (predicted / measured per plan, the median of
  |predicted / measured - 1|, pairwise order agreement)."""
  by = {r["plan"]: r for r in rows}
  out = {}
  if "auto" in by and "data" in by:
    out["auto_memory_le_data_parallel"] = (
        by["auto"]["memory_per_device"] <= by["data"]["memory_per_device"])
  base = [r for r in rows if r["plan"] not in ("auto", "jit")]
  if "auto" in by and base:
    best = min(base, key=lambda r: r["measured_step_seconds"])
    out["best_measured_baseline"] = best["plan"]
    out["auto_measured_over_best_baseline"] = (
        by["auto"]["measured_step_seconds"] / best["measured_step_seconds"])
    out["auto_measured_le_1.05x_best_baseline"] = (
        out["auto_measured_over_best_baseline"] <= 1.05)
  for prof in profiles:
    for key, tag in (("predicted", ""), ("predicted_compiled", "compiled:")):
      if not all(key in r for r in rows):
        continue
      ratio = {r["plan"]: r[key][prof]["step_seconds"] /
               r["measured_step_seconds"] for r in rows}
      out[f"predicted_over_measured[{tag}{prof}]"] = ratio
      out[f"median_abs_error[{tag}{prof}]"] = float(statistics.median(
          abs(v - 1) for v in ratio.values()))
      agree, total = order_agreement(rows, prof, key=key)
      out[f"order_agreement[{tag}{prof}]"] = [agree, total]
    if base and "auto" in by:
      best_p = min(base, key=lambda r: r["predicted"][prof]["step_seconds"])
      out[f"auto_predicted_le_best_baseline[{prof}]"] = (
          by["auto"]["predicted"][prof]["step_seconds"] <=
          best_p["predicted"][prof]["step_seconds"] * (1 + 1e-9))
  return out


def table(result: dict) -> str:
  profs = result["profiles"]
  head = (f"{'plan':<10} {'meas ms':>9} {'TFLOPS/dev':>10} {'mem MiB':>8} "
          f"{'coll MiB':>8} {'compile s':>9} " +
          " ".join(f"{'pred ms ' + p[:4]:>13}" for p in profs) + "  pred/meas(cpu)")
  lines = [f"{result['suite']}:{result['config']} ({result['params'] / 1e6:.2f}M "
           f"params, batch {result['batch']}, {result['devices']} devices, "
           f"{result['matmul_flops_per_step'] / 1e9:.2f} GFLOP/step)", head]
  for r in result["rows"]:
    coll = sum(r["collective_bytes"].values()) / 2 ** 20
    preds = " ".join(f"{r['predicted'][p]['step_seconds'] * 1e3:13.2f}" for p in profs)
    ratio = r["predicted"]["cpu"]["step_seconds"] / r["measured_step_seconds"] \
        if "cpu" in profs else float("nan")
    lines.append(f"{r['plan']:<10} {r['measured_step_seconds'] * 1e3:9.2f} "
                 f"{r['measured_tflops_per_device']:10.4f} "
                 f"{r['memory_per_device'] / 2 ** 20:8.2f} {coll:8.2f} "
                 f"{r['compile_seconds']:9.2f} {preds}  {ratio:8.2f}")
  by = {r["plan"]: r for r in result["rows"]}
  if "auto" in by:
    lines.append("ratios vs auto: " + ", ".join(
        f"{r['plan']} {r['measured_step_seconds'] / by['auto']['measured_step_seconds']:.2f}x time "
        f"{r['memory_per_device'] / by['auto']['memory_per_device']:.2f}x mem"
        for r in result["rows"] if r["plan"] != "auto"))
  chk = result["checks"]
  lines.append("checks: " + json.dumps(
      {k: v for k, v in chk.items() if not k.startswith(
          ("predicted_over_measured", "median_abs_error", "order_agreement"))}))
  for prof in profs:
    for tag, what in (("", "ILP"), ("compiled:", "compiled")):
      if f"order_agreement[{tag}{prof}]" not in chk:
        continue
      agree, total = chk[f"order_agreement[{tag}{prof}]"]
      lines.append(f"{prof} ({what}): median |pred/meas - 1| "
                   f"{chk[f'median_abs_error[{tag}{prof}]']:.2f}, order agrees "
                   f"on {agree}/{total} plan pairs (>10% apart measured); "
                   "pred/meas " + ", ".join(
                       f"{k} {v:.2f}" for k, v in
                       chk[f"predicted_over_measured[{tag}{prof}]"].items()))
  return "\n".join(lines)


def save(result: dict, out_dir: str, plot: bool = True) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  stem = f"{result['suite']}_{result['config']}"
  path = os.path.join(out_dir, stem + ".json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=str)
  files = [path]
  if plot:
    files.append(plot_result(result, os.path.join(out_dir, stem + ".png")))
  return files


def plot_result(result: dict, path: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  names = [r["plan"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  axes[0].bar(names, [r["measured_step_seconds"] * 1e3 for r in rows])
  axes[0].set_title("measured step time (ms)")
  axes[1].bar(names, [r["memory_per_device"] / 2 ** 20 for r in rows])
  axes[1].set_title("memory per device (MiB)")
  for prof in result["profiles"]:
    axes[2].plot(names, [r["predicted"][prof]["tflops_per_device"] for r in rows],
                 marker="o", label=prof)
  axes[2].set_title("predicted TFLOPS/device")
  axes[2].set_yscale("log")
  axes[2].legend(fontsize=7)
  for ax in axes:
    ax.tick_params(axis="x", rotation=30)
  fig.suptitle(f"{result['suite']}:{result['config']} on {result['devices']} devices")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
