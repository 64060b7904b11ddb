"""Sparse firing-neuron training vs dense training: time per iteration.

A two-layer shifted-ReLU regression (n points of dimension d on the unit
sphere, W ~ N(0, I), so correlations are N(0, 1)) trained by full-batch
gradient descent two ways, side by side in one run:

* dense: ``dense_sgd_step``, a plain ``jax.jit`` of value_and_grad (two
  n x m x d matmuls per step);
* sparse: ``sparse_sgd_step`` through the firing index (union of firing
  neurons from per-neuron maxima, outputs from stored correlations,
  gradients and index updates of the union only), index donated.

Two sweeps: width m at a fixed threshold, and threshold b at a fixed width.
For each it prints the measured per-point firing fraction (mean over points
of the share of neurons firing), the union fraction (share of neurons firing
on at least one point: it bounds the update cost), both times (median of
steps dispatched back to back, as a training loop runs them: the sparse
step is one device program with no host read) and the dense/sparse ratio,
then the crossover
(the smallest width, and the largest firing fraction, where sparse wins).

  python benchmarks/sparse_neurons.py [--quick] [--json out.json]
      [--backend auto|pallas|reference] [--record [PATH]]
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.kernels import sparse_neuron as sn
from alpa_py.kernels import tuning
from alpa_py.models.sparse_mlp import dense_sgd_step, sparse_sgd_step


def problem(n, d, m, seed=0):
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(n, d)).astype(np.float32)
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  y = (0.1 * rng.normal(size=(n,))).astype(np.float32)
  W = jax.random.normal(jax.random.PRNGKey(seed + 1), (m, d), jnp.float32)
  a = jax.random.rademacher(jax.random.PRNGKey(seed + 2), (m,), jnp.float32)
  return jnp.asarray(X), jnp.asarray(y), W, a


def median_step(step, state, reps, warmup=2, rounds=5):
  """Seconds per step: ``reps`` steps dispatched back to back (each feeds
  the next; no host read between them) and blocked on once, median over
  ``rounds``; the device's time per step, as a training loop sees it."""
  for _ in range(warmup):
    state = step(state)
  jax.block_until_ready(state)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(reps):
      state = step(state)
    jax.block_until_ready(state)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def measure(n, d, m, b, lr, reps, backend="auto", candidates=()):
  """One (width, threshold) point: dense vs the sparse step with
  ``backend``, and each backend in ``candidates`` timed too (for
  ``--record``)."""
  X, y, W, a = problem(n, d, m)
  index = sn.FiringIndex.build(W, X)
  fires = index.corr[:m] > b
  per_point = float(jnp.mean(fires))
  union = int(jnp.sum(index.neuron_max > b))
  capacity = sn.choose_capacity(union, m)
  infos = []
  b_dev, lr_dev = jnp.float32(b), jnp.float32(lr)

  def sparse_with(name):
    def sparse(index):
      index, loss, info = sparse_sgd_step(index, a, y, b_dev, lr_dev,
                                          capacity=capacity, backend=name)
      infos.append(info)  # read after the timing: no host read per step
      return index
    return sparse

  def dense(W):
    return dense_sgd_step(W, a, X, y, b_dev, lr_dev)[0]

  t_sparse = median_step(sparse_with(backend), index, reps)
  by_backend = {}
  for name in candidates:
    index = sn.FiringIndex.build(W, X)  # the last run donated its index
    by_backend[name] = 1e3 * median_step(sparse_with(name), index, reps)
  overflowed = sum(bool(i.overflow) for i in infos)
  t_dense = median_step(dense, W, reps)
  return dict(n=n, d=d, m=m, b=b, per_point_fraction=per_point,
              union_fraction=union / m, union=union, capacity=capacity,
              overflowed_steps=overflowed,
              dense_ms=1e3 * t_dense, sparse_ms=1e3 * t_sparse,
              sparse_ms_by_backend=by_backend,
              ratio=t_dense / t_sparse)


def record_rows(rows):
  """One record per measured size: the sparse backend timed fastest."""
  out = []
  for r in rows:
    times = r["sparse_ms_by_backend"]
    if times:
      out.append(dict(op="sparse_step", dtype="float32",
                      sizes=dict(neurons=r["m"], points=r["n"],
                                 features=r["d"], capacity=r["capacity"]),
                      best=min(times, key=times.get),
                      us={k: 1e3 * v for k, v in times.items()}))
  return out


def table(rows, title):
  print(f"\n{title}")
  print(f"{'m':>7} {'b':>5} {'per-point':>10} {'union':>8} {'dense ms':>9} "
        f"{'sparse ms':>10} {'dense/sparse':>12}")
  for r in rows:
    print(f"{r['m']:>7} {r['b']:>5.2f} {100 * r['per_point_fraction']:>9.3f}% "
          f"{100 * r['union_fraction']:>7.2f}% {r['dense_ms']:>9.2f} "
          f"{r['sparse_ms']:>10.2f} {r['ratio']:>11.2f}x")
  sys.stdout.flush()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=128)
  p.add_argument("--d", type=int, default=64)
  p.add_argument("--b", type=float, default=3.5,
                 help="threshold of the width sweep")
  p.add_argument("--width", type=int, default=65536,
                 help="width of the threshold sweep")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--backend", default="auto",
                 help="sparse operators: auto, pallas or reference")
  p.add_argument("--record", nargs="?", const="", default=None,
                 help="also time every backend (off GPU: the reference only; "
                      "interpreted Pallas is no candidate) and record the "
                      "fastest per size for backend='auto' (default: the "
                      "user's cache)")
  p.add_argument("--quick", action="store_true", help="small sizes (~20 s)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  widths = [256, 1024, 4096, 16384, 65536, 262144]
  thresholds = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
  if args.quick:
    widths, thresholds, args.width, args.reps = [1024, 8192], [1.0, 3.0], 8192, 3
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; n={args.n} "
        f"points, d={args.d}; lr 0.01; runs of {args.reps} steps, median of 5")

  candidates = () if args.record is None else (
      ("reference", "pallas") if jax.default_backend() == "gpu"
      else ("reference",))
  by_width = [measure(args.n, args.d, m, args.b, 0.01, args.reps,
                      args.backend, candidates)
              for m in widths]
  table(by_width, f"width sweep at b={args.b}")
  by_b = [measure(args.n, args.d, args.width, b, 0.01, args.reps,
                  args.backend, candidates)
          for b in thresholds]
  table(by_b, f"threshold sweep at m={args.width}")

  wins = [r for r in by_width if r["ratio"] > 1]
  print(f"\ncrossover in width (b={args.b}): sparse wins from m="
        f"{wins[0]['m'] if wins else 'none measured'}")
  wins_b = [r for r in by_b if r["ratio"] > 1]
  if wins_b:
    w = max(wins_b, key=lambda r: r["union_fraction"])
    print(f"crossover in firing (m={args.width}): sparse wins up to a union "
          f"fraction of {100 * w['union_fraction']:.1f}% (b={w['b']}, per-point "
          f"{100 * w['per_point_fraction']:.2f}%, {w['ratio']:.2f}x)")
  seen, big = set(), []
  for r in by_width + by_b:
    if r["m"] >= 65536 and r["union_fraction"] < 0.05 and (r["m"], r["b"]) not in seen:
      seen.add((r["m"], r["b"]))
      big.append(r)
  for r in big:
    print(f"m={r['m']} b={r['b']}: union {100 * r['union_fraction']:.2f}% -> "
          f"sparse {r['ratio']:.1f}x faster per iteration")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(by_width=by_width, by_threshold=by_b), f, indent=1)
  if args.record is not None:
    path = tuning.write(tuning.device_kind(), record_rows(by_width + by_b),
                        args.record or None)
    print(f"recorded the fastest sparse backend per size in {path}")


if __name__ == "__main__":
  main()
