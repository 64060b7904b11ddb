"""How much one calibration's price of whole training steps depends on its
draw: the CPU suite's measured programs priced by fits to many leverage
draws, per profiling budget and loss.

A CPU-suite run (``benchmarks/cpu_suite.py``) records, per plan, its
measured step time and the features of the program it compiled. Here every
program of ``--pools`` candidate pools (pool seeds 0, 1, ...) is profiled
once, in interleaved rounds (the least, as ``calibrate_model`` keeps), so a
draw's fit costs no profiling: per budget and loss, ``--draws`` leverage
draws per pool (the first is the draw ``calibrate_model(seed=s)`` itself
makes) are fitted and price every multi-device plan of the suite run.
Printed per budget and loss, over pools x draws: the median
|predicted / measured - 1| (its median, 90th percentile and worst), the
plan-pair order agreement (pairs more than 10% apart measured) and the
error of the pool programs not drawn.

  python benchmarks/calibration_budget.py --suite benchmarks/results \\
      --json benchmarks/results/calibration_budget.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alpa_py.bench import suite  # noqa: E402
from alpa_py.compiler import active_regression as ar  # noqa: E402
from alpa_py.compiler import calibration, calibration_pool  # noqa: E402
from alpa_py.compiler.cost_features import FEATURES  # noqa: E402
from alpa_py.compiler.cost_model import DeviceKey, LinearCostModel  # noqa: E402


def log(msg: str) -> None:
  print(f"[calibration budget] {msg}", file=sys.stderr, flush=True)


def suite_programs(directory: str) -> list[dict]:
  """Per config of a suite run: its multi-device rows (plan, measured
  seconds, features). Configs written before the suite recorded program
  features are left out, with a message."""
  out = []
  for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, ValueError):
      continue
    if not isinstance(data, dict) or "rows" not in data or "suite" not in data:
      continue
    rows = [r for r in data["rows"] if r["plan"] != "jit"]
    if not all("program_features" in r for r in rows):
      log(f"{path}: no program features (a suite run before 2026-11-29 "
          "evening); left out")
      continue
    out.append(dict(config=f"{data['suite']}:{data['config']}", rows=[
        dict(plan=r["plan"], measured_step_seconds=r["measured_step_seconds"],
             x=np.array([r["program_features"][f] for f in FEATURES]))
        for r in rows]))
  if not out:
    raise SystemExit(f"no suite result with program features in {directory!r}"
                     ": run benchmarks/cpu_suite.py --out DIR first")
  return out


def profile_pool(devices, seed: int, pool_size: int, rounds: int) -> dict:
  t0 = time.perf_counter()
  compiled = calibration.compile_pool(devices, pool_size, seed, progress=False)
  y, spent = calibration_pool.profile(compiled, rounds=rounds)
  log(f"pool {seed}: {len(compiled)} programs compiled and profiled in "
      f"{time.perf_counter() - t0:.0f} s")
  return dict(x=np.array([c.features for c in compiled]), y=y,
              profile_s=spent)


def score(model: LinearCostModel, configs: list[dict], n: int) -> tuple:
  """(median |pred/meas - 1| over every plan, agreeing pairs, pairs)."""
  errs, agree, total = [], 0, 0
  for c in configs:
    rows = [dict(r, fit={"m": {"step_seconds": float(model.predict(r["x"], n))}})
            for r in c["rows"]]
    errs += [abs(r["fit"]["m"]["step_seconds"] / r["measured_step_seconds"] - 1)
             for r in rows]
    a, t = suite.order_agreement(rows, "m", key="fit")
    agree, total = agree + a, total + t
  return float(statistics.median(errs)), agree, total


def evaluate(pools, configs, budgets, losses, draws, key, contention):
  n = key.num_devices
  res = {}
  for seed, pool in enumerate(pools):
    x, y = pool["x"], pool["y"]
    a = x / calibration.prior_seconds(x, key.platform)[:, None]
    for b in budgets:
      for k in range(draws):
        # draw 0 is calibrate_model(seed=seed)'s own selection
        rng = np.random.default_rng(seed if k == 0 else (seed, b, k))
        sel = ar.select("leverage", a, b, rng)
        rest = np.setdiff1d(np.arange(len(y)), sel.indices)
        for loss in losses:
          coef, _ = calibration.fit_coefficients(x[sel.indices], y[sel.indices],
                                                 sel.weights, key.platform,
                                                 loss)
          model = LinearCostModel(key=key, coefficients=tuple(map(float, coef)),
                                  contention=contention)
          med, agree, total = score(model, configs, n)
          held = float(np.median(np.abs(x[rest] @ coef - y[rest]) / y[rest]))
          res.setdefault((b, loss), []).append(dict(
              pool=seed, draw=k, median_error=med, order=[agree, total],
              heldout_median_error=held,
              profile_s=float(pool["profile_s"][sel.indices].sum())))
  return res


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--suite", default="benchmarks/results",
                 help="a cpu_suite.py output directory")
  p.add_argument("--pools", type=int, default=3)
  p.add_argument("--pool-size", type=int, default=calibration.DEFAULT_POOL_SIZE)
  p.add_argument("--draws", type=int, default=12)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--budgets", default="64,96,128,160")
  p.add_argument("--losses", default="l2,l1")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  t_start = time.perf_counter()
  configs = suite_programs(args.suite)
  budgets = [int(b) for b in args.budgets.split(",")]
  losses = args.losses.split(",")
  for b in budgets:
    calibration.check_budget(b, args.pool_size)
  devices = jax.devices()
  key = DeviceKey.of(devices)
  pools = [profile_pool(devices, s, args.pool_size, args.rounds)
           for s in range(args.pools)]
  contention = calibration_pool.measure_contention(devices)
  res = evaluate(pools, configs, budgets, losses, args.draws, key, contention)

  nplans = sum(len(c["rows"]) for c in configs)
  print(f"\nthe suite run in {args.suite}: {len(configs)} configs, {nplans} "
        f"multi-device plans; {args.pools} pools of {args.pool_size} x "
        f"{args.draws} leverage draws; labels the least of {args.rounds} "
        "interleaved rounds")
  print(f"{'budget':>6} {'loss':>4} | median |pred/meas-1|: median   q90  "
        "worst | default draws     | order agreement: median  worst | "
        "not drawn: median err | profiling s")
  for (b, loss), rs in sorted(res.items()):
    med = np.array([r["median_error"] for r in rs])
    agree = [r["order"][0] for r in rs]
    total = rs[0]["order"][1]
    default = " ".join(f"{r['median_error']:.3f}" for r in rs if r["draw"] == 0)
    print(f"{b:6d} {loss:>4} |             {np.median(med):6.3f} "
          f"{np.quantile(med, 0.9):5.3f} {med.max():6.3f} | {default:17s} | "
          f"{int(np.median(agree)):>13d}/{total} {min(agree):3d}/{total} | "
          f"{np.median([r['heldout_median_error'] for r in rs]):21.3f} | "
          f"{np.median([r['profile_s'] for r in rs]):6.1f}")
  print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(suite=args.suite, key=str(key), pools=args.pools,
                     pool_size=args.pool_size, draws=args.draws,
                     rounds=args.rounds, configs=[c["config"] for c in configs],
                     results={f"{b}:{loss}": rs
                              for (b, loss), rs in res.items()}), f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
