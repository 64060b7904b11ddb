"""Run one config's plans side by side: measured here and predicted under
cost profiles, with every figure in one JSON document."""

from __future__ import annotations

import json
import os

import jax

from alpa_py.bench import configs, plans
from alpa_py.bench.progress import Bar


def run_suite(suite: str, name: str, *, devices: int | None = None,
              steps: int = 5, profiles=("cpu", "a100_8x_nvlink_100gbps"),
              progress: bool = True) -> dict:
  """Measures and predicts every plan of one config; returns the figures."""
  cfg = configs.get_config(suite, name)
  devs = jax.devices()[:devices] if devices else jax.devices()
  n = len(devs)
  state = configs.make_state(cfg)
  batch = configs.make_batch(cfg)
  step = configs.make_step(cfg)
  methods = ["jit", "data", "zero2", "zero3", "auto"]
  manual = plans.manual_plans(suite, n)
  bar = Bar(len(methods) + len(manual) + 1, f"{suite}:{name}", progress)
  predictor = plans.Predictor(step, state, batch, n)
  bar.step("traced")
  flops = predictor.matmul_flops
  rows = []
  for m in methods + [p.name for p in manual]:
    bar.step(m)
    if m == "jit":
      meas = plans.measure_single(step, state, batch, steps)
    elif m in plans.METHODS:
      meas = plans.measure_method(step, state, batch,
                                  plans.METHODS[m](devices=devs), steps)
    else:
      plan = next(p for p in manual if p.name == m)
      meas = plans.measure_manual(step, state, batch, plan, devs, steps)
    used = 1 if m == "jit" else n
    pred = {}
    for prof in profiles:
      if m in plans.METHODS or m == "jit":
        sol = predictor.method(m, prof)
      else:
        sol = predictor.manual(next(p for p in manual if p.name == m), prof)
      pred[prof] = dict(step_seconds=sol.objective,
                        tflops_per_device=flops / sol.objective / used / 1e12,
                        mesh=list(sol.mesh_shape))
    rows.append(dict(plan=m, devices=used,
                     measured_step_seconds=meas.step_seconds,
                     measured_tflops_per_device=flops / meas.step_seconds / used / 1e12,
                     memory_per_device=meas.memory_per_device,
                     collective_bytes=meas.collective_bytes,
                     compile_seconds=meas.compile_seconds, ilp=meas.ilp,
                     predicted=pred))
  return dict(suite=suite, config=name, devices=n, params=configs.num_params(state),
              matmul_flops_per_step=flops, batch=cfg.batch, steps=steps,
              profiles=list(profiles), rows=rows, checks=checks(rows, profiles))


def checks(rows, profiles) -> dict:
  """What the suite asserts about itself: auto's memory vs data parallel, and
  auto's predicted time vs the best baseline under each profile; and how far
  the cpu prediction is from the cpu measurement, per plan."""
  by = {r["plan"]: r for r in rows}
  out = {}
  if "auto" in by and "data" in by:
    out["auto_memory_le_data_parallel"] = (
        by["auto"]["memory_per_device"] <= by["data"]["memory_per_device"])
  for prof in profiles:
    base = [r for r in rows if r["plan"] not in ("auto", "jit")]
    best = min(base, key=lambda r: r["predicted"][prof]["step_seconds"])
    out[f"auto_predicted_le_best_baseline[{prof}]"] = (
        by["auto"]["predicted"][prof]["step_seconds"] <=
        best["predicted"][prof]["step_seconds"] * (1 + 1e-9))
    out[f"best_baseline[{prof}]"] = best["plan"]
  out["cpu_prediction_error"] = {
      r["plan"]: r["predicted"]["cpu"]["step_seconds"] / r["measured_step_seconds"]
      for r in rows if "cpu" in r["predicted"]}
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
  lines.append("checks: " + json.dumps({k: v for k, v in result["checks"].items()
                                       if k != "cpu_prediction_error"}))
  err = result["checks"].get("cpu_prediction_error", {})
  if err:
    lines.append("cpu cost model vs measurement (predicted/measured): " +
                 ", ".join(f"{k} {v:.2f}" for k, v in err.items()))
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
