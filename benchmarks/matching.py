"""Online bipartite matching: sublinear weights, competitive ratios, and the
MoE router's routing quality, side by side in one run.

  items: 10,000 items, d = 128, arrivals one at a time (capacity 1 each).
    Per-arrival time of finding the best open item: the exact scan (one
    vectorised matrix-vector product plus argmax) against
    ``ClusteredMIPS.best`` (what greedy calls per arrival; ``top(x, 1)``
    beside it) at probe 1 (and 1 with the radius bound), 2, 4, each timed
    with the scan in interleaved rounds after untimed warm-up queries;
    inner products computed
    per arrival; matching value of greedy through the structure against
    greedy with exact weights. Embeddings are drawn from a 100-component
    Gaussian mixture (learned representations cluster) and, for contrast,
    from one isotropic Gaussian.
  ratios: value / offline optimum (OR-Tools min-cost flow) of greedy and
    the primal-dual on random instances and on greedy's adversarial
    instance, beside greedy's bound of 1/2.
  moe: the MoE-small config's router inputs (its first MoE layer's gate at
    initialisation applied to the layer-normed token embeddings, position
    and attention left out; batch 32 x 64 tokens, 8 experts)
    at capacity factors 1.0, 1.25 and 2.0: tokens dropped (no expert) and
    gate mass kept by GShard's top-2, the online-matching router and the
    offline optimum of the same b-matching (each token up to 2 experts).

  train (--train): MoE-small trained 300 steps (AdamW 1e-3, fresh batches
    from a fixed random bigram chain each step) with each router at each
    capacity factor over 3 seeds: the loss over the last 10 steps.

  python benchmarks/matching.py [--json benchmarks/results/matching.json]
      [--train [--steps 300] [--seeds 3]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from alpa_py import matching as mt  # noqa: E402


def _timed(fns, xs, warm=(), rounds=8):
  """Median seconds per call of each function over the queries ``xs``,
  timed in interleaved rounds (each function takes every ``rounds``-th
  query in turn) so that the shared machine's slow spells fall on all of
  them alike; before each round a function first answers the ``warm``
  queries, untimed, so that each is timed in its own steady state of the
  caches, not in the state the other one left."""
  times = {name: [] for name in fns}
  for r in range(rounds):
    for name, fn in fns.items():
      for x in warm:
        fn(x)
      for x in xs[r::rounds]:
        t0 = time.perf_counter()
        fn(x)
        times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def part_items(n=10_000, d=128, arrivals=5_000, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for kind in ("mixture", "isotropic"):
    if kind == "mixture":
      centers = rng.normal(size=(100, d)).astype(np.float32)
      E = centers[rng.integers(100, size=n)] + 0.3 * rng.normal(size=(n, d))
      A = centers[rng.integers(100, size=arrivals)] + \
          0.3 * rng.normal(size=(arrivals, d))
    else:
      E = rng.normal(size=(n, d))
      A = rng.normal(size=(arrivals, d))
    E, A = E.astype(np.float32), A.astype(np.float32)
    exact = mt.ExactWeights(E)
    buf = np.empty(n, np.float32)
    # the scan: one vectorised product into a kept buffer, plus argmax
    scan = lambda x: int(E.dot(x, buf).argmax())  # noqa: E731
    warm = A[2000:2200]
    t = _timed({"scan": scan, "exact_top": lambda x: exact.top(x, 1)},
               A[:2000], warm)
    g_exact = mt.greedy(E, 1, A)
    row = dict(data=kind, n=n, d=d, arrivals=arrivals,
               exact_scan_us=1e6 * t["scan"],
               exact_top_us=1e6 * t["exact_top"],
               exact_inner_products=n, greedy_exact_value=g_exact.value,
               mips={})
    for probe, bound in ((1, False), (1, True), (2, False), (4, False)):
      opts = dict(probe=probe, seed=seed, radius_bound=bound)
      index = mt.ClusteredMIPS(E, **opts)
      # each structure timed against the scan in the same rounds, one
      # structure in memory at a time (as it would be deployed); ``best``
      # is what greedy calls per arrival, ``top(x, 1)`` returns arrays
      t = _timed({"scan": scan, "mips": index.best,
                  "top1": lambda x: index.top(x, 1)}, A[:2000], warm)
      k = index.num_clusters
      index = None  # one structure in memory at a time
      g = mt.greedy(mt.ClusteredMIPS(E, **opts), 1, A)
      row["mips"][f"{probe}{'+radius' if bound else ''}"] = dict(
          us=1e6 * t["mips"], top1_us=1e6 * t["top1"],
          scan_us=1e6 * t["scan"], speedup_vs_scan=t["scan"] / t["mips"],
          inner_products=k + probe * n / k,
          greedy_value_ratio=g.value / g_exact.value)
    out.append(row)
  return out


def part_ratios(seeds=5):
  rows = []
  for seed in range(seeds):
    rng = np.random.default_rng(100 + seed)
    E = rng.normal(size=(50, 16)).astype(np.float32)
    A = rng.normal(size=(400, 16)).astype(np.float32)
    opt = mt.offline_optimum(E, 4, A).value
    rows.append(dict(instance=f"random {seed}",
                     greedy=mt.greedy(E, 4, A).value / opt,
                     primal_dual=mt.primal_dual(E, 4, A).value / opt))
  for cap in (1, 20):
    items, c, arr = mt.adversarial_instance(cap)
    opt = mt.offline_optimum(items, c, arr).value
    rows.append(dict(instance=f"adversarial (capacity {cap})",
                     greedy=mt.greedy(items, c, arr).value / opt,
                     primal_dual=mt.primal_dual(items, c, arr).value / opt))
  return rows


def part_moe(capacity_factors=(1.0, 1.25, 2.0), seed=0):
  import jax
  import jax.numpy as jnp

  from alpa_py.bench import configs
  from alpa_py.matching.router import online_matching_top2

  cfg = configs.get_config("moe", "small")
  state = configs.make_state(cfg)
  batch = configs.make_batch(cfg)
  params = state.params["params"]
  x = params["wte"]["embedding"][batch["x"]].reshape(-1, cfg.model["hidden"])
  first = sorted((k for k in params if k.startswith("moe_")),
                 key=lambda k: int(k.split("_")[1]))[0]
  gate = params[first]["gate"]
  # the first MoE layer's input is the layer-normed embedding
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  probs = jax.nn.softmax(((x - mu) / jnp.sqrt(var + 1e-6)) @ gate, -1)
  probs = np.asarray(probs, np.float32)
  t, e = probs.shape
  rows = []
  for cf in capacity_factors:
    cap = max(1, int(cf * 2 * t / e))
    # GShard: top-2 in token order, dropped where full
    top = np.argsort(-probs, 1)[:, :2]
    fill = np.zeros(e, int)
    kept = np.zeros((t, 2), bool)
    for k in range(2):
      for i in range(t):
        j = top[i, k]
        if fill[j] < cap:
          fill[j] += 1
          kept[i, k] = True
    g_mass = float((probs[np.arange(t)[:, None], top] * kept).sum())
    g_drop = int((~kept.any(1)).sum())
    experts, _, _ = online_matching_top2(jnp.asarray(probs), cap)
    ex = np.asarray(experts)
    o_mass = float(sum(probs[i, j] for i in range(t) for j in ex[i] if j >= 0))
    o_drop = int((ex < 0).all(1).sum())
    opt = mt.offline_optimum(np.eye(e, dtype=np.float32), cap, probs,
                             per_arrival=2)
    rows.append(dict(capacity_factor=cf, capacity=cap, tokens=t,
                     gshard_dropped=g_drop / t, gshard_mass=g_mass / t,
                     online_dropped=o_drop / t, online_mass=o_mass / t,
                     optimum_dropped=opt.unmatched / t,
                     optimum_mass=opt.value / t))
  return rows


def _markov_batches(vocab, batch, seq, seed):
  """Fresh batches each step from a fixed random bigram chain (8 likely
  successors per token), so a model can learn something in 300 steps."""
  rng = np.random.default_rng(1234)  # the chain: the same for every run
  succ = rng.integers(0, vocab, size=(vocab, 8))
  data = np.random.default_rng(seed)
  while True:
    tok = np.empty((batch, seq), np.int32)
    tok[:, 0] = data.integers(0, vocab, batch)
    for t in range(1, seq):
      tok[:, t] = succ[tok[:, t - 1], data.integers(0, 8, batch)]
    yield tok


def part_train(steps=300, seeds=3, capacity_factors=(1.0, 1.25, 2.0),
               routers=("gshard_top2", "online_matching")):
  """Loss after ``steps`` of AdamW (1e-3) on MoE-small with each router,
  mean and standard deviation over ``seeds``."""
  import jax
  import optax
  from flax.training import train_state

  from alpa_py.bench import configs
  from alpa_py.models import MoEModel
  from alpa_py.models.gpt import lm_loss

  cfg = configs.get_config("moe", "small")
  rows = []
  for cf in capacity_factors:
    for router in routers:
      model = MoEModel(**cfg.model, router=router, capacity_factor=cf)

      @jax.jit
      def step(state, tokens):
        def loss_fn(p):
          return lm_loss(state.apply_fn(p, tokens), tokens)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

      finals, t0 = [], time.time()
      for seed in range(seeds):
        batches = _markov_batches(cfg.model["vocab_size"], cfg.batch,
                                  cfg.seq, seed)
        params = model.init(jax.random.PRNGKey(seed), next(batches))
        state = train_state.TrainState.create(
            apply_fn=model.apply, params=params, tx=optax.adamw(1e-3))
        tail = []
        for i in range(steps):
          state, loss = step(state, next(batches))
          if i >= steps - 10:
            tail.append(float(loss))  # blocks: one step in flight on CPU
          elif i % 20 == 0:
            jax.block_until_ready(loss)
        finals.append(float(np.mean(tail)))
      rows.append(dict(capacity_factor=cf, router=router, steps=steps,
                       seeds=seeds, final_losses=finals,
                       mean=float(np.mean(finals)),
                       std=float(np.std(finals, ddof=1)) if seeds > 1 else 0.0,
                       seconds=time.time() - t0))
      print(f"  cf {cf:4.2f} {router:>15}: loss {rows[-1]['mean']:.4f} "
            f"+- {rows[-1]['std']:.4f} ({rows[-1]['seconds']:.0f} s)",
            flush=True)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--json", default=None)
  ap.add_argument("--train", action="store_true",
                  help="also train MoE-small 300 steps per router, "
                       "capacity factor and seed (~40 min on 2 cores)")
  ap.add_argument("--steps", type=int, default=300)
  ap.add_argument("--seeds", type=int, default=3)
  args = ap.parse_args(argv)
  t0 = time.time()
  items = part_items()
  print("items: 10,000 x 128, arrivals one at a time, capacity 1")
  print(f"{'data':>10} {'scan us':>8} {'probe':>8} {'best us':>8} "
        f"{'top1 us':>8} {'speedup':>8} {'inner prods':>11} "
        f"{'value / exact greedy':>21}")
  for r in items:
    for p, m in r["mips"].items():
      print(f"{r['data']:>10} {m['scan_us']:8.1f} {p:>8} {m['us']:8.1f} "
            f"{m['top1_us']:8.1f} {m['speedup_vs_scan']:7.2f}x "
            f"{m['inner_products']:11.0f} {m['greedy_value_ratio']:21.4f}")
  ratios = part_ratios()
  print("\nvalue / offline optimum (greedy's worst case: 0.5)")
  for r in ratios:
    print(f"{r['instance']:>28}  greedy {r['greedy']:.3f}  "
          f"primal-dual {r['primal_dual']:.3f}")
  moe = part_moe()
  print("\nMoE-small router inputs (first layer at init, 2048 tokens, "
        "8 experts): dropped tokens / gate mass kept per token")
  print(f"{'cf':>5} {'cap':>4} {'gshard':>15} {'online':>15} {'optimum':>15}")
  for r in moe:
    print(f"{r['capacity_factor']:5.2f} {r['capacity']:4d} "
          f"{r['gshard_dropped']:6.3f} / {r['gshard_mass']:.3f} "
          f"{r['online_dropped']:6.3f} / {r['online_mass']:.3f} "
          f"{r['optimum_dropped']:6.3f} / {r['optimum_mass']:.3f}")
  train = []
  if args.train:
    print(f"\nMoE-small, {args.steps} steps, loss over the last 10 (mean +- "
          f"std over {args.seeds} seeds), fresh bigram-chain batches")
    train = part_train(args.steps, args.seeds)
  elif args.json and os.path.exists(args.json):
    with open(args.json) as f:  # keep the last training table
      train = json.load(f).get("train", [])
  print(f"\n{time.time() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(items=items, ratios=ratios, moe=moe, train=train), f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
