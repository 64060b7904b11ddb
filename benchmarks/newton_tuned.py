"""Wall time to the target loss of the matrix-free GGN solvers, each with
the best CG iteration cap of a grid (as the first-order methods in
``newton.py`` get the best learning rate of a grid), medians of repeats
interleaved in a shuffled order per round, side by side in one run.

Solvers: ``cg``; ``sketched_cg`` at sketch size 128 (caps 200 and 400:
below 200 its solves break down); ``nystrom_cg`` at rank 64 and 128 with
the factor rebuilt every 10 steps (``nystrom_refresh=10``). Problems:
``newton.py``'s digits regression (the issue's) and digits cross entropy.

  python benchmarks/newton_tuned.py [--repeats 3] [--json out.json]
"""

import argparse
import json
import statistics
import sys

import numpy as np

import newton as nb

CAPS = (50, 100, 200, 400)


def configs():
  out = [("cg", None, 1, cap) for cap in CAPS]
  out += [("sketched_cg", 128, 1, cap) for cap in (200, 400)]
  for rank in (64, 128):
    out += [("nystrom_cg", rank, 10, cap) for cap in CAPS]
  return out


def family(cfg):
  solver, rank, refresh, _ = cfg
  return solver if rank is None else f"{solver}(s={rank}" + (
      f",r={refresh})" if refresh > 1 else ")")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--ggn-iters", type=int, default=60)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  run_args = argparse.Namespace(ggn_iters=args.ggn_iters, max_seconds=30.0,
                                quick=False)
  rng = np.random.default_rng(0)
  results = {}
  for prob in (nb.digits("mse", False), nb.digits("cross_entropy", False)):
    times = {cfg: [] for cfg in configs()}
    steps, cg = {}, {}
    for _ in range(args.repeats):
      order = list(times)
      rng.shuffle(order)
      for cfg in order:
        solver, rank, refresh, cap = cfg
        try:
          curve, extra = nb.ggn_curve(prob, solver, run_args,
                                      sketch_size=rank, refresh=refresh,
                                      cap=cap)
          it, t = nb.reached(curve, prob["target"])
        except nb.SingularGramError:
          it, t, extra = None, None, {}
        times[cfg].append(t if t is not None else float("inf"))
        # CG iterations of the steps taken to reach the target
        cg[cfg] = (int(sum(extra["cg_iters"][:it])) if it is not None
                   else None)
        steps[cfg] = it
    med = {cfg: statistics.median(ts) for cfg, ts in times.items()}
    best = {}
    for cfg, t in med.items():
      f = family(cfg)
      if f not in best or t < best[f][1]:
        best[f] = (cfg[3], t, steps[cfg], times[cfg], cg[cfg])
    ref = best["cg"][1]
    print(f"\n{prob['name']} (target {prob['target']:g}): median seconds to "
          f"the target over {args.repeats} interleaved repeats, best cap")
    print(f"{'solver':<26}{'cap':>5}{'steps':>7}{'CG iters':>9}"
          f"{'seconds':>10}{'vs cg':>8}  repeats")
    rows = {}
    for f, (cap, t, it, ts, n_cg) in best.items():
      print(f"{f:<26}{cap:>5}{str(it):>7}{str(n_cg):>9}{t:>10.3f}"
            f"{t / ref:>8.2f}  " + " ".join(f"{x:.3f}" for x in ts))
      rows[f] = dict(cap=cap, steps=it, cg_iterations=n_cg,
                     median_seconds=t, repeats=ts)
    results[prob["name"]] = dict(
        best=rows, all={f"{family(c)} cap {c[3]}": dict(
            seconds=v, steps=steps[c], cg_iterations=cg[c])
            for c, v in times.items()})
    sys.stdout.flush()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1, default=lambda x: None)
  return 0


if __name__ == "__main__":
  sys.exit(main())
