"""Batched multi-LoRA operator latency: the grouped kernel vs per-adapter loop
vs gather + batched matmul, over batch size x adapter popularity x rank.

On a GPU the kernel is the Pallas one and GB/s is reported against the
bytes-moved bound 2*(T*(H_in+H_out) + n_distinct*r*(H_in+H_out)) (fp16); on
CPU the grouped kernel is the ragged_dot backend (Pallas would run in
interpret mode, which is a correctness tool, not a timing one), and the
"gather" column is the reference backend that ``auto`` picks there.

Times are device time by default (``device_time``: a jitted loop of many
dependent calls); ``--per-call`` times one jitted call from Python instead
(dispatch included, as the first H100 figures were). ``--record`` writes
the fastest backend at each (rank, batch) to the records ``backend="auto"``
reads (``alpa_py.kernels.tuning``; the user's cache, or ``--record
PATH``).

  python benchmarks/lora_kernels.py [--hidden 4096] [--quick] [--json out.json]
      [--per-call] [--record [PATH]]
"""

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.kernels import lora
from alpa_py.kernels import tuning

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


def device_time(op, x, ids, *, calls=64, reps=10):
  """Seconds per call of ``op(x, ids)`` as device time: one jitted loop of
  ``calls`` dependent calls less a loop of one call, over ``calls - 1``
  (dispatch and the host are out of it). Each call reads the previous
  one's output (scaled by a traced zero), so none is hoisted or skipped."""

  def looped(n):
    @jax.jit
    def run(x, ids, eps):
      body = lambda i, c: c + eps * op(c, ids)[:, :c.shape[1]]
      return jax.lax.fori_loop(0, n, body, x)
    return run

  eps = jnp.zeros((), x.dtype)
  one = timeit(looped(1), x, ids, eps, reps=reps)
  many = timeit(looped(calls), x, ids, eps, reps=reps)
  return max(many - one, 0.0) / (calls - 1)


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
  ap.add_argument("--per-call", action="store_true",
                  help="time single calls from Python (dispatch included)")
  ap.add_argument("--calls", type=int, default=64,
                  help="calls per jitted loop for device time")
  ap.add_argument("--record", nargs="?", const="", default=None,
                  help="write the fastest backend per size for "
                       "backend='auto' (default: the user's cache)")
  args = ap.parse_args()
  gpu = jax.default_backend() == "gpu"
  hidden = args.hidden or (4096 if gpu else 1024)
  dtype = jnp.float16 if gpu else jnp.float32
  ranks = [int(r) for r in args.ranks.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  pops = POPULARITY
  if args.quick:
    ranks, batches, pops = [16], [1, 16, 64], ("distinct", "identical")
  # interpreted Pallas is a correctness tool: off GPU it is not a candidate
  backends = ["pallas", "reference", "ragged_dot"] if gpu else \
      ["reference", "ragged_dot"]
  bw = (args.bandwidth or 3350.0) * 1e9
  rng = np.random.default_rng(0)
  n = args.adapters
  how = "per call (dispatch included)" if args.per_call else \
      f"device time (jitted loop of {args.calls} calls)"
  print(f"device {jax.devices()[0].device_kind}, hidden {hidden}, {n} adapters, "
        f"dtype {jnp.dtype(dtype).name}, {how}")
  head = " ".join(f"{b[:9] + ' us':>12}" for b in backends)
  print(f"{'rank':>4} {'pop':>9} {'T':>3} {head} {'loop us':>9} "
        f"{'best':>10} {'gather/best':>11} {'GB/s':>7} {'%bw':>5}")
  rows = []
  for r in ranks:
    k = jax.random.split(jax.random.PRNGKey(r), 3)
    A = (jax.random.normal(k[0], (n, hidden, r)) * 0.02).astype(dtype)
    B = (jax.random.normal(k[1], (n, r, hidden)) * 0.02).astype(dtype)
    scale = jnp.ones((n,), jnp.float32)
    ops = {b: functools.partial(lambda x, ids, b: lora.bgmv(
        x, A, B, ids, scale, backend=b), b=b) for b in backends}
    ops["loop"] = lambda x, ids: per_adapter_loop(x, A, B, ids, scale)
    for pop in pops:
      for t in batches:
        ids = jnp.asarray(ids_for(pop, t, n, rng), jnp.int32)
        x = jax.random.normal(k[2], (t, hidden)).astype(dtype)
        us = {}
        for name, op in ops.items():
          sec = timeit(jax.jit(op), x, ids) if args.per_call else \
              device_time(op, x, ids, calls=args.calls)
          us[name] = sec * 1e6
        best = min(backends, key=us.get)
        distinct = len(np.unique(np.asarray(ids)))
        item = jnp.dtype(dtype).itemsize
        bound = item * (t * 2 * hidden + distinct * r * 2 * hidden)
        gbs = bound / (us[best] * 1e-6) / 1e9 if us[best] > 0 else float("nan")
        row = dict(rank=r, popularity=pop, batch=t, distinct=distinct,
                   us=us, best=best, bytes_bound=bound, gbps=gbs,
                   timing="per_call" if args.per_call else "device")
        rows.append(row)
        pct = f"{100 * gbs * 1e9 / bw:5.1f}" if gpu else "    -"
        cells = " ".join(f"{us[b]:12.1f}" for b in backends)
        print(f"{r:>4} {pop:>9} {t:>3} {cells} {us['loop']:9.1f} {best:>10} "
              f"{us['reference'] / max(us[best], 1e-9):11.2f} {gbs:7.1f} {pct}",
              flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "hidden": hidden,
                 "adapters": n, "backends": backends, "rows": rows}, f,
                indent=1)
  if args.record is not None:
    path = tuning.write(tuning.device_kind(),
                             record_rows(rows, backends, dtype, hidden),
                             args.record or None)
    print(f"recorded the fastest backend per (rank, batch) in {path}")
  return 0


def record_rows(rows, backends, dtype, hidden):
  """One record per (rank, batch): the backend with the lowest median time
  over the adapter popularities measured (``auto`` sees shapes, not ids)."""
  out = []
  for key in sorted({(r["rank"], r["batch"]) for r in rows}):
    group = [r for r in rows if (r["rank"], r["batch"]) == key]
    med = {b: statistics.median(r["us"][b] for r in group) for b in backends}
    out.append(dict(op="lora_bgmv", dtype=jnp.dtype(dtype).name,
                    sizes=dict(tokens=key[1], rank=key[0], h_in=hidden,
                               h_out=hidden),
                    best=min(backends, key=med.get), us=med))
  return out


if __name__ == "__main__":
  sys.exit(main())
