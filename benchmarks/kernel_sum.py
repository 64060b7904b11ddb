"""KernelSum against the exact sum and uniform random sampling, side by
side in one run, on the protocol kernel-density benchmarks use: n points
(default 1,000,000) of a 100-component Gaussian mixture in d = 32 and 128,
Gaussian kernel, bandwidths that put the mean density between 1e-3 and
1e-2; queries drawn from the same mixture, answered one at a time.

Per setting: build time; single-query latency of the exact sum (one pass
over the points), of KernelSum and of uniform sampling with the fewest
samples that keep 90% of queries within 0.1 (doubling from 1,024); the
share of KernelSum's answers within eps = 0.1; batched throughput (the
exact sum for 256 queries as one matrix product, against KernelSum's one
query at a time); an insert and a delete against a rebuild.

Adaptive adversary (n = 20,000, d = 16, 1,000 queries,
``kernel_sum.adaptive_attack``): a fixed uniform sample of 4,000 points
(its error bound: the 90th percentile of its error on queries chosen in
advance), KernelSum with a fixed seed (``robust=False``) and KernelSum.

  python benchmarks/kernel_sum.py [--n 1000000] [--json benchmarks/results/kernel_sum.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from alpa_py.sketch import kernel_sum as kmod
from alpa_py.sketch.kernel_sum import KernelSum


def mixture(n, d, comps=100, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(comps, d)) * 3
  x = (centers[rng.integers(comps, size=n)] +
       rng.normal(size=(n, d))).astype(np.float32)
  return x, centers


def _per_query(fn, Y):
  times = []
  out = []
  for y in Y:
    t0 = time.perf_counter()
    out.append(fn(y))
    times.append(time.perf_counter() - t0)
  return np.asarray(out), statistics.median(times)


def uniform_sampling(X, Y, exact, h, rng):
  """The fewest uniform samples (doubling) keeping 90% of the queries
  within 0.1, and its per-query latency."""
  n = len(X)
  sq = (X.astype(np.float64) ** 2).sum(1)
  m = 1024
  while True:
    def est(y):
      idx = rng.integers(0, n, m)
      d2 = np.maximum(sq[idx] - 2.0 * (X[idx] @ y) + float(y @ y), 0.0)
      return float(np.exp(-d2 / (2 * h * h)).mean())
    got, t = _per_query(est, Y)
    within = float((np.abs(got / exact - 1) <= 0.1).mean())
    if within >= 0.9 or m >= n:
      return dict(samples=m, us=1e6 * t, within=within)
    m *= 2


def part_scale(n, d, h, queries=200, seed=0):
  X, centers = mixture(n, d, seed=seed)
  rng = np.random.default_rng(seed + 1)
  Y = (centers[rng.integers(len(centers), size=queries)] +
       rng.normal(size=(queries, d))).astype(np.float32)
  ks = KernelSum("gaussian", h, eps=0.1, delta=0.1, seed=seed)
  t0 = time.perf_counter()
  ks.insert(X)
  build = time.perf_counter() - t0
  exact, t_exact = _per_query(lambda y: ks.query_exact(y)[0], Y)
  evals = []

  def one(y):
    v = ks.query(y)[0]
    evals.append(ks.last_evaluations)
    return v
  est, t_ks = _per_query(one, Y)
  rel = np.abs(est / exact - 1)
  uni = uniform_sampling(X, Y, exact, h, rng)
  # batched: the exact sum of 256 queries as one matrix product
  B = Y[:256] if len(Y) >= 256 else np.concatenate([Y] * (256 // len(Y) + 1))[:256]
  sq = (X * X).sum(1)  # float32 throughout, as the product is
  t0 = time.perf_counter()
  for a in range(0, len(B), 64):
    blk = B[a:a + 64]
    d2 = np.maximum(sq[:, None] - 2.0 * (X @ blk.T) +
                    (blk * blk).sum(1)[None], 0.0)
    np.exp(d2 * np.float32(-1 / (2 * h * h))).mean(0)
  t_batch = time.perf_counter() - t0
  t0 = time.perf_counter()
  ks.query(B)
  t_ks_batch = time.perf_counter() - t0
  # one insert and one delete at a time, against a rebuild
  new = X[rng.integers(n, size=200)] + 0.1
  t_ins = []
  ids = []
  for p in new:
    t0 = time.perf_counter()
    ids.append(int(ks.insert(p)[0]))
    t_ins.append(time.perf_counter() - t0)
  t_del = []
  for i in ids:
    t0 = time.perf_counter()
    ks.delete([i])
    t_del.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  ks.rebuild()
  t_rebuild = time.perf_counter() - t0
  return dict(
      n=n, d=d, bandwidth=h, mean_density=float(exact.mean()),
      build_s=build, exact_us=1e6 * t_exact, kernel_sum_us=1e6 * t_ks,
      speedup_vs_exact=t_exact / t_ks,
      within_eps=float((rel <= 0.1).mean()),
      rel_err_p50=float(np.median(rel)), rel_err_p90=float(np.quantile(
          rel, 0.9)),
      evaluations_median=int(np.median(evals)), uniform=uni,
      uniform_vs_kernel_sum=uni["us"] / (1e6 * t_ks),
      batch_exact_qps=len(B) / t_batch, batch_kernel_sum_qps=len(B) /
      t_ks_batch, insert_us=1e6 * statistics.median(t_ins),
      delete_us=1e6 * statistics.median(t_del), rebuild_s=t_rebuild,
      insert_share_of_rebuild=statistics.median(t_ins) / t_rebuild)


def part_adversary(queries=1000, seed=0):
  X, _ = mixture(20000, 16, comps=50, seed=seed)
  h = 4.0
  rng = np.random.default_rng(seed + 2)
  ks = KernelSum("gaussian", h, eps=0.1, delta=0.1, seed=seed)
  ks.insert(X)
  fixed = kmod.FixedSampleKDE(X, "gaussian", h, 4000, seed=seed)
  Y = X[rng.integers(len(X), size=300)]
  bound = float(np.quantile(np.abs(fixed.query(Y) / ks.query_exact(Y) - 1),
                            0.9))
  fixed_seed = KernelSum("gaussian", h, eps=0.1, delta=0.1, seed=seed,
                         robust=False)
  fixed_seed.insert(X)
  out = {}
  for name, est in (("fixed sample (4,000)", fixed),
                    ("KernelSum, fixed seed", fixed_seed),
                    ("KernelSum", ks)):
    e = kmod.adaptive_attack(est, X, "gaussian", h, queries=queries,
                             seed=seed + 1)
    out[name] = dict(within_eps=float((e <= 0.1).mean()),
                     past_2x_fixed_bound=float((e > 2 * bound).mean()),
                     p90=float(np.quantile(e, 0.9)))
  return dict(fixed_sample_bound=bound, results=out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=1_000_000)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  t0 = time.time()
  rows = []
  for d, hs in ((32, (4.0, 6.0)), (128, (8.0, 12.0))):
    for h in hs:
      r = part_scale(args.n, d, h)
      rows.append(r)
      print(f"n={r['n']} d={d} h={h}: density {r['mean_density']:.1e}; "
            f"exact {r['exact_us']:.0f} us, KernelSum {r['kernel_sum_us']:.0f}"
            f" us ({r['speedup_vs_exact']:.1f}x), within 0.1: "
            f"{r['within_eps']:.2f} (p90 err {r['rel_err_p90']:.3f}), "
            f"{r['evaluations_median']} evaluations; uniform sampling "
            f"{r['uniform']['samples']} samples {r['uniform']['us']:.0f} us "
            f"({r['uniform_vs_kernel_sum']:.1f}x KernelSum's); batch "
            f"exact {r['batch_exact_qps']:.0f} q/s vs KernelSum "
            f"{r['batch_kernel_sum_qps']:.0f} q/s; insert "
            f"{r['insert_us']:.0f} us, delete {r['delete_us']:.0f} us, "
            f"rebuild {r['rebuild_s']:.1f} s; build {r['build_s']:.1f} s")
      sys.stdout.flush()
  adv = part_adversary()
  print(f"adaptive adversary, 1,000 queries (fixed sample's bound "
        f"{adv['fixed_sample_bound']:.3f}):")
  for name, r in adv["results"].items():
    print(f"  {name:>22}: within eps {r['within_eps']:.2f}, past 2x the "
          f"fixed sample's bound {r['past_2x_fixed_bound']:.2f}, p90 error "
          f"{r['p90']:.3f}")
  print(f"{time.time() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(scale=rows, adversary=adv), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
