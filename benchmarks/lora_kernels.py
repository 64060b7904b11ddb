"""Batched multi-LoRA operator latency: the grouped kernel vs per-adapter loop
vs gather + batched matmul, over batch size x adapter popularity x rank.

On a GPU the kernel is the Pallas one and GB/s is reported against the
bytes-moved bound 2*(T*(H_in+H_out) + n_distinct*r*(H_in+H_out)) (fp16); on
CPU the grouped kernel is the ragged_dot backend (Pallas would run in
interpret mode, which is a correctness tool, not a timing one), and the
"gather" column is the reference backend that ``auto`` picks there.

  python benchmarks/lora_kernels.py [--hidden 4096] [--quick] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.kernels import lora

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed")


def ids_for(kind, t, n, rng):
  if kind == "distinct":
    return np.arange(t) % n
  if kind == "identical":
    return np.zeros(t, np.int64)
  if kind == "uniform":
    return rng.integers(0, n, t)
  if kind == "zipf":
    p = 1.0 / np.arange(1, n + 1) ** 1.5
    return rng.choice(n, t, p=p / p.sum())
  # skewed: 3/4 of tokens on one adapter, the rest uniform
  return np.where(rng.uniform(size=t) < 0.75, 0, rng.integers(0, n, t))


def timeit(fn, *args, reps=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def per_adapter_loop(x, A, B, ids, scale):
  """One adapter at a time, as a server without batched LoRA would."""
  y = jnp.zeros((x.shape[0], B.shape[-1]), jnp.float32)
  for a in range(A.shape[0]):
    m = (ids == a).astype(jnp.float32)[:, None]
    y = y + m * scale[a] * (x @ A[a]).astype(jnp.float32) @ B[a].astype(jnp.float32)
  return y.astype(x.dtype)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=None)
  ap.add_argument("--adapters", type=int, default=64)
  ap.add_argument("--ranks", default="8,16,32,64")
  ap.add_argument("--batches", default="1,2,4,8,16,32,64")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--json", default=None)
  ap.add_argument("--bandwidth", type=float, default=None,
                  help="device memory bandwidth, GB/s (default: H100 3350)")
  args = ap.parse_args()
  gpu = jax.default_backend() == "gpu"
  hidden = args.hidden or (4096 if gpu else 1024)
  dtype = jnp.float16 if gpu else jnp.float32
  ranks = [int(r) for r in args.ranks.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  pops = POPULARITY
  if args.quick:
    ranks, batches, pops = [16], [1, 16, 64], ("distinct", "identical")
  kernel_backend = "pallas" if gpu else "ragged_dot"
  bw = (args.bandwidth or 3350.0) * 1e9
  rng = np.random.default_rng(0)
  n = args.adapters
  print(f"device {jax.devices()[0].device_kind}, hidden {hidden}, {n} adapters, "
        f"dtype {jnp.dtype(dtype).name}, kernel = {kernel_backend}")
  print(f"{'rank':>4} {'pop':>9} {'T':>3} {'kernel us':>10} {'loop us':>9} "
        f"{'gather us':>9} {'loop/k':>7} {'gather/k':>8} {'GB/s':>7} {'%bw':>5}")
  rows = []
  for r in ranks:
    k = jax.random.split(jax.random.PRNGKey(r), 3)
    A = (jax.random.normal(k[0], (n, hidden, r)) * 0.02).astype(dtype)
    B = (jax.random.normal(k[1], (n, r, hidden)) * 0.02).astype(dtype)
    scale = jnp.ones((n,), jnp.float32)
    kern = jax.jit(lambda x, ids: lora.bgmv(x, A, B, ids, scale,
                                            backend=kernel_backend))
    gath = jax.jit(lambda x, ids: lora.bgmv(x, A, B, ids, scale,
                                            backend="reference"))
    loop = jax.jit(lambda x, ids: per_adapter_loop(x, A, B, ids, scale))
    for pop in pops:
      for t in batches:
        ids = jnp.asarray(ids_for(pop, t, n, rng), jnp.int32)
        x = jax.random.normal(k[2], (t, hidden)).astype(dtype)
        tk, tl, tg = timeit(kern, x, ids), timeit(loop, x, ids), timeit(gath, x, ids)
        distinct = len(np.unique(np.asarray(ids)))
        item = jnp.dtype(dtype).itemsize
        bound = item * (t * 2 * hidden + distinct * r * 2 * hidden)
        gbs = bound / tk / 1e9
        row = dict(rank=r, popularity=pop, batch=t, distinct=distinct,
                   kernel_us=tk * 1e6, loop_us=tl * 1e6, gather_us=tg * 1e6,
                   bytes_bound=bound, gbps=gbs)
        rows.append(row)
        pct = f"{100 * gbs * 1e9 / bw:5.1f}" if gpu else "    -"
        print(f"{r:>4} {pop:>9} {t:>3} {tk * 1e6:10.1f} {tl * 1e6:9.1f} "
              f"{tg * 1e6:9.1f} {tl / tk:7.2f} {tg / tk:8.2f} {gbs:7.1f} {pct}",
              flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "hidden": hidden,
                 "adapters": n, "kernel": kernel_backend, "rows": rows}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
