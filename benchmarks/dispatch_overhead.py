"""Per-call dispatch time of ``alpa_py.parallelize`` against ``jax.jit``.

Two parts, each in its own process (the device count is fixed when JAX is
imported):

  leaves: a tiny step over 800 small leaves on 1 CPU device, where the
    per-call Python work is the whole cost (issue #17's target:
    parallelize / jit <= 1.10).
  gpt: a GPT "tiny" training step (``alpa_py.bench.configs``) on 8 simulated
    CPU devices.

Each part times, in interleaved rounds (A B C A B C ...), blocks of calls of:
``jit`` (``jax.jit`` of the step, default placement), ``compiled`` (the
parallelized step's own compiled program called directly: the floor of
JAX's C++ dispatch for that program), ``parallelize`` (the fast path),
and ``signature`` (the same executable reached through the full signature,
``make_signature``, as every call did before the fast path). Every call is
followed by ``jax.block_until_ready`` on its outputs, as a training loop that
reads its loss would; each variant feeds its outputs back as the next
inputs. Figures are medians over rounds of the mean per-call time.

Usage:
  python benchmarks/dispatch_overhead.py [--rounds 15] [--calls 20]
      [--gpt-calls 3]
      [--json benchmarks/results/dispatch_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_DEVICES = {"leaves": 1, "gpt": 8}


def _timed(fn, state, calls):
  """Mean seconds per call over ``calls`` chained, blocked calls."""
  import jax
  t0 = time.perf_counter()
  for _ in range(calls):
    state = fn(state)
    jax.block_until_ready(state)
  return (time.perf_counter() - t0) / calls, state


def _interleaved(variants, rounds, calls):
  """Median over rounds of each variant's per-call seconds (A B C, A B C)."""
  states = {name: init for name, (_, init) in variants.items()}
  for name, (fn, _) in variants.items():  # warm-up: compile, fill caches
    _, states[name] = _timed(fn, states[name], 2)
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (fn, _) in variants.items():
      t, states[name] = _timed(fn, states[name], calls)
      times[name].append(t)
  return {name: statistics.median(ts) for name, ts in times.items()}, times


def _variants(step, args, par):
  """The four variants of a step ``step(state, *rest) -> state``-like call
  (state first; the output's first element, or the output, fed back)."""
  import jax
  jitted = jax.jit(step)
  rest = args[1:]
  ex = par.get_executable(*args)
  compiled = ex.task.compiled

  def first(out):
    return out[0] if isinstance(out, tuple) else out

  def direct(state):
    # placed inputs, the program, the output tree: no key, no checks
    leaves = jax.tree_util.tree_leaves((state,) + rest)
    outs = compiled(*leaves)
    return first(jax.tree_util.tree_unflatten(ex._out_tree, list(outs)))

  def full_path(state):
    e, leaves = par._executable_and_leaves((state,) + rest)
    return first(e.call_flat(leaves))

  placed = first(par(*args))  # in the planned layout, like later steps
  return {
      "jit": (lambda s: first(jitted(s, *rest)), args[0]),
      "compiled": (direct, placed),
      "parallelize": (lambda s: first(par(s, *rest)), args[0]),
      "signature": (full_path, args[0]),
  }


def _part_leaves():
  import jax
  import jax.numpy as jnp

  import alpa_py

  def step(tree, x):
    return jax.tree_util.tree_map(lambda w: w * 0.99 + x, tree)

  tree = {f"w{i:03d}": jnp.full((4,), float(i), jnp.float32)
          for i in range(800)}
  par = alpa_py.parallelize(step)
  args = (tree, jnp.float32(0.5))
  return _variants(step, args, par), {"leaves": 800, "method": "ShardParallel"}


def _part_gpt():
  import alpa_py
  from alpa_py.bench.configs import get_config, make_batch, make_state, make_step
  import jax

  cfg = get_config("gpt", "tiny")
  step = make_step(cfg)
  state, batch = make_state(cfg), make_batch(cfg)
  par = alpa_py.parallelize(step, method=alpa_py.DataParallel())
  info = {"leaves": len(jax.tree_util.tree_leaves((state, batch))),
          "method": "DataParallel", "config": "gpt tiny",
          "batch": cfg.batch, "seq": cfg.seq}
  return _variants(step, (state, batch), par), info


def run_part(part: str, rounds: int, calls: int) -> dict:
  import jax
  variants, info = {"leaves": _part_leaves, "gpt": _part_gpt}[part]()
  med, times = _interleaved(variants, rounds, calls)
  return {
      "part": part, "devices": jax.device_count(), **info,
      "rounds": rounds, "calls_per_round": calls,
      "ms_per_call": {k: v * 1e3 for k, v in med.items()},
      "ms_per_call_rounds": {k: [t * 1e3 for t in v] for k, v in times.items()},
      "ratio_parallelize_over_jit": med["parallelize"] / med["jit"],
      "ratio_parallelize_over_compiled": med["parallelize"] / med["compiled"],
      "ratio_signature_over_jit": med["signature"] / med["jit"],
  }


def _child(part: str, rounds: int, calls: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={_DEVICES[part]}"
                      ).strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("ALPA_PY_QUIET", "1")
  out = subprocess.run([sys.executable, __file__, "--part", part,
                        "--rounds", str(rounds), "--calls", str(calls)],
                       env=env, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--part", choices=sorted(_DEVICES), help="(internal) run "
                  "one part in this process")
  ap.add_argument("--parts", default="leaves,gpt")
  ap.add_argument("--rounds", type=int, default=15)
  ap.add_argument("--calls", type=int, default=20,
                  help="calls per round of the 800-leaf step")
  ap.add_argument("--gpt-calls", type=int, default=3,
                  help="calls per round of the GPT step (~0.1 s each)")
  ap.add_argument("--json", help="write every figure here")
  a = ap.parse_args()
  if a.part:
    print(json.dumps(run_part(a.part, a.rounds, a.calls)))
    return
  t0 = time.time()
  results = [_child(p, a.rounds, a.gpt_calls if p == "gpt" else a.calls)
             for p in a.parts.split(",")]
  print(f"{'part':8s} {'devices':>7s} {'jit':>9s} {'compiled':>9s} "
        f"{'parallel':>9s} {'signature':>9s}  par/jit  par/compiled  sig/jit")
  for r in results:
    m = r["ms_per_call"]
    print(f"{r['part']:8s} {r['devices']:7d} {m['jit']:8.3f}ms "
          f"{m['compiled']:8.3f}ms {m['parallelize']:8.3f}ms "
          f"{m['signature']:8.3f}ms  {r['ratio_parallelize_over_jit']:6.3f}  "
          f"{r['ratio_parallelize_over_compiled']:11.3f}  "
          f"{r['ratio_signature_over_jit']:6.3f}")
  leaves = next((r for r in results if r["part"] == "leaves"), None)
  if leaves is not None:
    ok = leaves["ratio_parallelize_over_jit"] <= 1.10
    print(f"800-leaf step: parallelize/jit = "
          f"{leaves['ratio_parallelize_over_jit']:.3f} (target <= 1.10: "
          f"{'met' if ok else 'missed'})")
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump({"machine": {"python": platform.python_version(),
                             "cpus": os.cpu_count(),
                             "processor": platform.processor()},
                 "date": time.strftime("%Y-%m-%d %H:%M"),
                 "seconds": round(time.time() - t0, 1),
                 "results": results}, f, indent=1)
    print("wrote", a.json)


if __name__ == "__main__":
  main()
