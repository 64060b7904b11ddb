"""Approximate attention (``sketch.KVAttention``; the serving engine's
``attention="kernel_sum"``) against exact attention, side by side in one
run.

Part 1, a synthetic KV cache of 32,768 tokens, head dim 64: keys from a
64-component Gaussian mixture (a real cache's keys cluster), values with a
per-component mean plus noise; queries near a stored key, ``q = s k + z``
with ``s`` in {0.5, 1, 2} (from diffuse to peaked attention; ``z``
standard normal), and an iid regime (keys, values and queries standard
normal: the output nearly cancels). Per regime, queries one at a time as
decode asks them: the share within eps = 0.1 of the exact output (relative
l2 error), the error's median and 90th percentile, the key evaluations
(and the centres scored), and the latency of exact attention (one pass
over the cache) against the structure's, timed interleaved (exact,
sketched, exact, ...; medians).

Adaptive adversary (``sketch.attention.adaptive_attack``, 20,000 keys of a
32-component mixture, d = 32, 400 queries, each half of them a small
step from the worst query found so far): the share within eps of the
structure with fresh draws per query and of the same with one fixed
generator state (``robust=False``).

Part 2, teacher forcing on a tiny GPT (vocab 256, hidden 128, 2 heads of
64, 2 layers, seq_len 8192): a prompt of 8,000 random tokens, the exact
engine's greedy continuation of 40 tokens, then ``Engine.score`` along it
with each attention: the share of steps where the sketched model's argmax
is the exact one, key evaluations against the keys exact attention reads,
and the score's wall time. Two models: the random initialisation (diffuse
attention, logits near ties) and the same with the query projection
scaled by 3 (peaked attention, as trained models have).

  python benchmarks/approx_attention.py [--json benchmarks/results/approx_attention.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from alpa_py.sketch import KVAttention
from alpa_py.sketch.attention import adaptive_attack


def cache(n, d, regime, seed=0):
  rng = np.random.default_rng(seed)
  if regime == "iid":
    K = rng.normal(size=(n, d))
    V = rng.normal(size=(n, d))
  else:
    ck, cv = rng.normal(size=(64, d)), rng.normal(size=(64, d))
    lab = rng.integers(64, size=n)
    K = ck[lab] + 0.5 * rng.normal(size=(n, d))
    V = cv[lab] + rng.normal(size=(n, d))
  return K.astype(np.float32), V.astype(np.float32)


def synthetic(n, d, queries, eps, seed=0):
  rows = []
  for regime, s in (("clustered", 0.5), ("clustered", 1.0),
                    ("clustered", 2.0), ("iid", None)):
    K, V = cache(n, d, regime, seed)
    t = time.perf_counter()
    st = KVAttention(d, eps=eps, seed=seed)
    st.insert(K, V)
    build = time.perf_counter() - t
    rng = np.random.default_rng(seed + 1)
    errs, evals, te, ta = [], [], [], []
    for _ in range(queries):
      z = rng.normal(size=d).astype(np.float32)
      q = z if s is None else K[rng.integers(n)] * s + z
      t = time.perf_counter()
      exact = st.attend_exact(q)[0]
      te.append(time.perf_counter() - t)
      t = time.perf_counter()
      approx = st.attend(q)[0]
      ta.append(time.perf_counter() - t)
      errs.append(float(np.linalg.norm(approx - exact) /
                        np.linalg.norm(exact)))
      evals.append(st.last_evaluations)
    errs = np.asarray(errs)
    name = regime if s is None else f"{regime} s={s}"
    rows.append(dict(
        regime=name, n=n, d=d, build_s=build, centres=st.last_centres,
        within_eps=float(np.mean(errs <= eps)),
        err_median=float(np.median(errs)),
        err_p90=float(np.quantile(errs, 0.9)), err_max=float(errs.max()),
        evals_median=float(np.median(evals)),
        evals_mean=float(np.mean(evals)),
        exact_ms=1e3 * statistics.median(te),
        sketch_ms=1e3 * statistics.median(ta)))
    r = rows[-1]
    print(f"  {name:16s} within {eps}: {r['within_eps']:5.0%}  err "
          f"med {r['err_median']:.2g} p90 {r['err_p90']:.2g}  evals med "
          f"{r['evals_median']:7.0f} ({r['evals_median'] / n:5.1%}) + "
          f"{r['centres']} centres  exact {r['exact_ms']:.2f} ms, sketch "
          f"{r['sketch_ms']:.2f} ms: {r['exact_ms'] / r['sketch_ms']:.2f}x",
          flush=True)
  return rows


def adversary(eps, queries=400, seed=0):
  rng = np.random.default_rng(seed)
  n, d = 20000, 32
  ck, cv = rng.normal(size=(32, d)), rng.normal(size=(32, d))
  lab = rng.integers(32, size=n)
  K = (ck[lab] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
  V = (cv[lab] + rng.normal(size=(n, d))).astype(np.float32)
  rows = []
  for robust in (False, True):
    st = KVAttention(d, eps=eps, seed=seed, robust=robust)
    st.insert(K, V)
    e = adaptive_attack(st, queries=queries, gain=1.0, step=0.05, seed=seed)
    rows.append(dict(robust=robust, within_eps=float(np.mean(e <= eps)),
                     err_p90=float(np.quantile(e, 0.9)),
                     err_max=float(e.max())))
    print(f"  {'fresh draws' if robust else 'fixed seed '}: within {eps} "
          f"{rows[-1]['within_eps']:.1%}, error p90 "
          f"{rows[-1]['err_p90']:.3f}, max {rows[-1]['err_max']:.3f}",
          flush=True)
  return rows


def tiny_model(gain, seq_len):
  import jax
  import jax.numpy as jnp

  from alpa_py.models.gpt import GPT, GPTConfig
  cfg = GPTConfig(vocab_size=256, seq_len=seq_len, hidden=128, num_heads=2,
                  num_layers=2, lora_adapters=1, lora_rank=4)
  model = GPT(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                      jnp.zeros((1,), jnp.int32))

  def scale_q(path, x):
    names = [getattr(p, "key", None) for p in path]
    if "qkv" in names and names[-1] == "kernel":
      return x.at[:, :cfg.hidden].multiply(gain)
    return x
  return model, jax.tree_util.tree_map_with_path(scale_q, params)


def teacher_forced(prompt_len, steps, eps_list, seed=0):
  from alpa_py import serve
  rows = []
  for gain in (1.0, 3.0):
    model, params = tiny_model(gain, prompt_len + steps + 192)
    rng = np.random.default_rng(seed)
    req = serve.Request(prompt=[int(t) for t in
                                rng.integers(256, size=prompt_len)],
                        max_new_tokens=steps)
    exact = serve.Engine(model, params, max_batch=1, page_size=64)
    traj = exact.generate([req])[0]
    exact.score(req, traj[:2])  # compiled before timing
    t = time.perf_counter()
    ref = exact.score(req, traj)
    t_exact = time.perf_counter() - t
    top2 = np.sort(ref, 1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    for eps in eps_list:
      eng = serve.Engine(model, params, max_batch=1, page_size=64,
                         attention="kernel_sum",
                         attention_options=dict(eps=eps, seed=seed))
      eng.score(req, traj[:2])
      before = eng.stats
      t = time.perf_counter()
      got = eng.score(req, traj)
      t_sk = time.perf_counter() - t
      st = eng.stats
      ev = st.attention_evaluations - before.attention_evaluations
      keys = st.attention_keys - before.attention_keys
      rows.append(dict(
          query_gain=gain, eps=eps, prompt=prompt_len, steps=steps,
          agreement=float(np.mean(got.argmax(1) == np.asarray(traj))),
          max_logit_diff=float(np.abs(got - ref).max()),
          margins_below_0p05=int(np.sum(margin < 0.05)),
          evaluations=int(ev), keys=int(keys),
          exact_s=t_exact, sketch_s=t_sk))
      r = rows[-1]
      print(f"  q gain {gain:.0f}, eps {eps}: argmax agrees on "
            f"{r['agreement']:.0%} of {steps} steps (exact top-2 margins "
            f"< 0.05 on {r['margins_below_0p05']}), max logit diff "
            f"{r['max_logit_diff']:.2f}; key evaluations {ev} / {keys} "
            f"({ev / keys:.2f}); score {t_exact:.2f} s exact, {t_sk:.2f} s "
            f"sketched", flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--n", type=int, default=32768)
  ap.add_argument("--d", type=int, default=64)
  ap.add_argument("--queries", type=int, default=200)
  ap.add_argument("--eps", type=float, default=0.1)
  ap.add_argument("--prompt", type=int, default=8000)
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  print(f"synthetic KV cache: {args.n} tokens, head dim {args.d}, "
        f"{args.queries} queries one at a time", flush=True)
  syn = synthetic(args.n, args.d, args.queries, args.eps)
  print("adaptive adversary, 400 queries:", flush=True)
  adv = adversary(args.eps)
  print(f"tiny GPT, teacher-forced: prompt {args.prompt}, {args.steps} "
        f"steps", flush=True)
  tf = teacher_forced(args.prompt, args.steps, (0.1, 0.05))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(synthetic=syn, adversary=adv, teacher_forced=tf,
                     command=" ".join(sys.argv)), f, indent=1)


if __name__ == "__main__":
  main()
