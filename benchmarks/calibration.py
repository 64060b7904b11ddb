"""Calibrating the cost model: active selection vs uniform random selection
vs profiling everything, at equal profiling budgets.

A pool of candidate programs (single ops under their strategies,
collectives, one-layer steps under baseline plans) is compiled (features)
and every program is profiled once, in interleaved rounds. Then, per seed,
a quarter of the pool is held out and each rule picks ``budget`` programs of
the rest to "profile" (their labels are looked up); the model fitted to
them predicts the held-out programs. Reported: the held-out error (mean
|predicted - measured| / measured) per budget, the profiles each rule needs
to come within 10% of the full-profile error, and what calibration costs in
time (compiling the pool for its features + profiling the chosen programs).

  python benchmarks/calibration.py --json benchmarks/results/calibration.json \\
      --png benchmarks/results/calibration.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alpa_py.compiler import active_regression as ar  # noqa: E402
from alpa_py.compiler import calibration, calibration_pool  # noqa: E402
from alpa_py.compiler.cost_features import FEATURES  # noqa: E402
from alpa_py.compiler.cost_model import DeviceKey  # noqa: E402


def log(msg: str) -> None:
  print(f"[calibration bench] {msg}", file=sys.stderr, flush=True)


def measure_pool(pool_size: int, rounds: int):
  """Features, labels, compile and profile seconds of every program, and
  the run-to-run spread of the labels (two halves of the rounds)."""
  devices = jax.devices()
  t0 = time.perf_counter()
  compiled = calibration.compile_pool(devices, pool_size, progress=False)
  log(f"compiled {len(compiled)} programs in {time.perf_counter() - t0:.0f} s")
  half = max(rounds // 2, 1)
  t0 = time.perf_counter()
  first, spent_a = calibration_pool.profile(compiled, rounds=half)
  log(f"profiled all (rounds 1-{half}) in {time.perf_counter() - t0:.0f} s")
  t0 = time.perf_counter()
  second, spent_b = calibration_pool.profile(compiled, rounds=half)
  log(f"profiled all (rounds {half + 1}-{2 * half}) in "
      f"{time.perf_counter() - t0:.0f} s")
  return dict(
      ids=[c.candidate.id for c in compiled],
      x=np.array([c.features for c in compiled]),
      y=np.minimum(first, second),
      spread=np.abs(first - second) / np.minimum(first, second),
      compile_s=np.array([c.compile_seconds for c in compiled]),
      # a calibration profiles each chosen program once, all its rounds
      profile_s=spent_a + spent_b, key=DeviceKey.of(devices))


def evaluate(data, budgets, rules, seeds, draws, loss):
  """Per rule and budget, over seeds (held-out splits) x draws (selections):
  the held-out error against the measured times, the gap to the
  full-profile model's predictions, and the calibration seconds."""
  x, y = data["x"], data["y"]
  n = len(y)
  prior = calibration.prior_seconds(x, data["key"].platform)
  a, t = x / prior[:, None], y / prior
  keys = ("err", "gap", "time")
  out = {"full": [], "full_time": [],
         **{k: {r: {m: [] for m in budgets} for r in rules} for k in keys}}
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    test, train = perm[:n // 4], np.sort(perm[n // 4:])
    pool_compile = float(data["compile_s"][train].sum())

    def predict(idx, w):
      coef = ar.fit(a[train][idx], t[train][idx], w, loss=loss)
      return x[test] @ np.clip(coef, 0, None)

    full = predict(np.arange(len(train)), None)
    out["full"].append(float(np.mean(np.abs(full - y[test]) / y[test])))
    out["full_time"].append(pool_compile
                            + float(data["profile_s"][train].sum()))
    for m in budgets:
      for r in rules:
        for k in range(draws):
          sel = ar.select(r, a[train], m,
                          np.random.default_rng((seed, m, k)))
          pred = predict(sel.indices, sel.weights)
          out["err"][r][m].append(float(np.mean(np.abs(pred - y[test])
                                                / y[test])))
          out["gap"][r][m].append(float(np.mean(np.abs(pred - full) / full)))
          out["time"][r][m].append(
              pool_compile + float(data["profile_s"][train][sel.indices].sum()))
  return out


def needed(curve: dict, target: float):
  """The smallest budget whose mean error is within ``target``."""
  for m in sorted(curve):
    if curve[m] <= target:
      return m
  return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pool", type=int, default=240)
  p.add_argument("--seeds", type=int, default=5,
                 help="held-out splits (each with its own selections)")
  p.add_argument("--draws", type=int, default=4,
                 help="selections per seed and budget")
  p.add_argument("--rounds", type=int, default=4,
                 help="interleaved timing rounds per program (two halves)")
  p.add_argument("--rules", default="bss,leverage,uniform")
  p.add_argument("--loss", default="l2", choices=("l2", "l1"))
  p.add_argument("--quick", action="store_true",
                 help="a pool of 60, 2 seeds (a smoke test, not the figure)")
  p.add_argument("--json", default=None)
  p.add_argument("--png", default=None)
  args = p.parse_args(argv)
  if args.quick:
    args.pool, args.seeds, args.rounds, args.draws = 60, 2, 2, 1
  rules = args.rules.split(",")
  t_start = time.perf_counter()
  data = measure_pool(args.pool, args.rounds)
  n_train = args.pool - args.pool // 4
  d = calibration.minimum_budget()
  budgets = sorted({b for b in (d, d + 4, d + 8, int(1.5 * d), 2 * d,
                                n_train // 3, int(2.5 * d), 3 * d, 4 * d,
                                n_train // 2, n_train) if d <= b <= n_train})
  res = evaluate(data, budgets, rules, args.seeds, args.draws, args.loss)
  full = float(np.mean(res["full"]))
  full_time = float(np.mean(res["full_time"]))
  mean = {k: {r: {m: float(np.mean(res[k][r][m])) for m in budgets}
              for r in rules} for k in ("err", "gap", "time")}

  print(f"\ncost-model calibration: pool {args.pool} programs on "
        f"{data['key']}; {n_train} to choose from, {args.pool - n_train} held "
        f"out; {args.seeds} seeds x {args.draws} draws; {len(FEATURES)} "
        f"coefficients; {args.loss} fit, rows weighted by a label-free prior "
        "(relative error)")
  print(f"label noise: median run-to-run spread {np.median(data['spread']):.1%}"
        f" (mean {np.mean(data['spread']):.1%}) between two halves of "
        f"{args.rounds} interleaved rounds")
  print(f"full profile ({n_train} programs): held-out error {full:.3f} "
        f"(seeds {', '.join(f'{e:.3f}' for e in res['full'])})\n")
  print("held-out error (mean |pred - measured| / measured), mean ± sd over "
        "seeds x draws; gap: mean |pred - full-profile pred| / full-profile "
        "pred")
  head = "budget " + "".join(f"| {r + ' err':>16} " for r in rules) + \
      "".join(f"| {r[:4] + ' gap':>8} " for r in rules) + "| best/uniform"
  print(head)
  print("-" * len(head))
  for m in budgets:
    cells = "".join(f"| {mean['err'][r][m]:7.3f} ±{np.std(res['err'][r][m]):6.3f} "
                    for r in rules)
    gaps = "".join(f"| {mean['gap'][r][m]:8.3f} " for r in rules)
    best = min((r for r in rules if r != "uniform"),
               key=lambda r: mean["err"][r][m], default=None)
    ratio = (f"| {best} {mean['err'][best][m] / mean['err']['uniform'][m]:.2f}x"
             if best and "uniform" in rules else "")
    print(f"{m:6d} {cells}{gaps}{ratio}")
  target = 1.1 * full
  print(f"\nprofiles to come within 10% of the full-profile error "
        f"(<= {target:.3f}), and calibration time (compiling the "
        f"{n_train}-program pool + profiling the chosen):")
  summary = {}
  for r in rules:
    m = needed(mean["err"][r], target)
    secs = mean["time"][r][m] if m else None
    summary[r] = {"profiles": m, "seconds": secs}
    share = f"{m / n_train:.0%} of {n_train}" if m else "not reached"
    print(f"  {r:9s} {str(m):>5s} ({share})" +
          (f", {secs:.0f} s" if secs else ""))
  print(f"  {'all':9s} {n_train:5d} (100%), {full_time:.0f} s")
  print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")

  record = dict(pool=args.pool, seeds=args.seeds, rounds=args.rounds,
                loss=args.loss, key=str(data["key"]), features=list(FEATURES),
                draws=args.draws, n_train=n_train, budgets=budgets,
                full=res["full"],
                curves={r: {str(m): res["err"][r][m] for m in budgets}
                        for r in rules},
                gaps={r: {str(m): res["gap"][r][m] for m in budgets}
                      for r in rules},
                seconds={r: {str(m): res["time"][r][m] for m in budgets}
                         for r in rules},
                needed=summary, full_seconds=full_time,
                label_spread_median=float(np.median(data["spread"])),
                ids=data["ids"], labels=data["y"].tolist(),
                x=data["x"].tolist())
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(record, f)
  if args.png:
    import matplotlib  # (slow to import: only for the figure)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rules:  # the band: one standard error of the mean
      mu = np.array([mean["err"][r][m] for m in budgets])
      se = np.array([np.std(res["err"][r][m]) / np.sqrt(len(res["err"][r][m]))
                     for m in budgets])
      line, = ax.plot(budgets, mu, marker="o", ms=3, label=r)
      ax.fill_between(budgets, mu - se, mu + se, color=line.get_color(),
                      alpha=0.2)
    ax.axhline(full, color="k", ls="--", label=f"all {n_train}")
    ax.axhline(target, color="k", ls=":", lw=0.8, label="all + 10%")
    ax.set_xlabel("programs profiled")
    ax.set_ylabel("held-out mean relative error")
    ax.set_ylim(0, min(3 * full, ax.get_ylim()[1]))
    ax.legend()
    ax.set_title(f"cost-model calibration ({args.pool} programs, "
                 f"{args.seeds} seeds)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
  return record


if __name__ == "__main__":
  main()
