"""Sketching primitives side by side: k-means++ seeding (alpa_py.sketch,
fast and plain) against scikit-learn's ``kmeans_plusplus``, on one
synthetic Gaussian mixture; seeding time, seeding cost over seeds, and the
cost after Lloyd iterations from each seeding (one seed).

  python benchmarks/sketch.py [--n 200000 --d 768 --k 256 --seeds 5]
      [--lloyd-iters 10] [--json benchmarks/results/sketch.json]

Needs scikit-learn (the ``bench`` extra).
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from alpa_py.sketch import kmeans_cost, kmeans_plusplus, lloyd  # noqa: E402


def mixture(n, d, comps, seed=0):
  """``comps`` Gaussian components of unit variance around centers drawn
  with standard deviation 1 per coordinate (fixed seed)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(comps, d)).astype(np.float32)
  x = centers[rng.integers(comps, size=n)]
  x += rng.normal(size=(n, d)).astype(np.float32)
  return x


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=200_000)
  ap.add_argument("--d", type=int, default=768)
  ap.add_argument("--k", type=int, default=256)
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--lloyd-iters", type=int, default=10)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  from sklearn.cluster import kmeans_plusplus as sk_kmeans_plusplus

  t0 = time.time()
  X = mixture(args.n, args.d, args.k)
  print(f"k-means++ seeding: n {args.n}, d {args.d}, k {args.k} "
        f"({args.k}-component mixture), seeds 0-{args.seeds - 1}", flush=True)
  runs = {"alpa_py fast": lambda s: kmeans_plusplus(
              jax.random.PRNGKey(s), X, args.k, method="fast"),
          "sklearn": lambda s: sk_kmeans_plusplus(X, args.k, random_state=s)}
  out = {name: dict(seconds=[], cost=[], centers=None) for name in runs}
  for s in range(args.seeds):
    for name, fn in runs.items():  # interleaved: A B A B ...
      t = time.perf_counter()
      centers, _ = fn(s)
      out[name]["seconds"].append(time.perf_counter() - t)
      out[name]["cost"].append(kmeans_cost(X, centers))
      if s == 0:
        out[name]["centers"] = centers
      print(f"  seed {s} {name:>13}: {out[name]['seconds'][-1]:7.2f} s, "
            f"cost {out[name]['cost'][-1]:.5g}", flush=True)
  rows = {}
  for name, r in out.items():
    rows[name] = dict(median_seconds=float(np.median(r["seconds"])),
                      mean_cost=float(np.mean(r["cost"])),
                      seconds=r["seconds"], cost=r["cost"])
    if args.lloyd_iters:
      _, c = lloyd(X, r["centers"], args.lloyd_iters)
      rows[name]["cost_after_lloyd_seed0"] = float(c)
  f, sk = rows["alpa_py fast"], rows["sklearn"]
  summary = dict(
      speedup=sk["median_seconds"] / f["median_seconds"],
      seeding_cost_ratio=f["mean_cost"] / sk["mean_cost"])
  if args.lloyd_iters:
    summary["lloyd_cost_ratio"] = (f["cost_after_lloyd_seed0"] /
                                   sk["cost_after_lloyd_seed0"])
  print(f"\n{'':>14} {'median s':>9} {'mean cost':>12} "
        f"{'cost after ' + str(args.lloyd_iters) + ' Lloyd':>20}")
  for name, r in rows.items():
    print(f"{name:>14} {r['median_seconds']:9.2f} {r['mean_cost']:12.5g} "
          f"{r.get('cost_after_lloyd_seed0', float('nan')):20.5g}")
  print(f"sklearn / fast time {summary['speedup']:.2f}x; fast / sklearn "
        f"seeding cost {summary['seeding_cost_ratio']:.3f}" +
        (f"; after Lloyd {summary['lloyd_cost_ratio']:.4f}"
         if args.lloyd_iters else ""))
  print(f"({time.time() - t0:.0f} s)")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(config=vars(args), kmeans=rows, summary=summary), fh,
                indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
