"""Gram-Gauss-Newton vs first-order training: iterations and wall time to a
target training loss, side by side in one run.

Problems (full-batch):

* ``synthetic``: two-layer ReLU regression, n=256 points of dimension 32,
  m=8192 hidden units (p = 270k parameters >> n), random targets;
* ``digits-mse``: scikit-learn's bundled digits (the first 256 images,
  pixels scaled to [0, 1]), 64-256-10 MLP regressed onto one-hot labels
  (N = 2560 outputs, p = 19k);
* ``digits-ce``: the same MLP with softmax cross-entropy (the generalized
  Gauss-Newton step).

Methods: GGN with each solver (cholesky, cg, sketched_cg at its default
2N sketch; sketched_cg and nystrom_cg at one sketch size, ``--sketch``,
and nystrom_cg with its factor rebuilt every 10 steps, ``r=10``),
Adam and SGD with momentum 0.9 (each with the best of a grid of learning rates: the one that
reaches the target first, else the lowest final loss), and
``jaxopt.GaussNewton`` (regressions only) when jaxopt is installed. Every
step is blocked on; the time is the sum of step times.

  python benchmarks/newton.py [--quick] [--json out.json] [--png out.png]
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alpa_py.optim import gram_gauss_newton
from alpa_py.optim import SingularGramError


def mlp_apply(p, x):
  h = jax.nn.relu(x @ p["W1"] + p["b1"])
  return h @ p["W2"] + p["b2"]


def two_layer_apply(p, x):
  return jnp.dot(jax.nn.relu(x @ p["W"].T), p["a"]) / np.sqrt(p["a"].shape[0])


def synthetic(quick):
  n, d, m = (64, 16, 1024) if quick else (256, 32, 8192)
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  params = {"W": jax.random.normal(jax.random.PRNGKey(0), (m, d)) / np.sqrt(d),
            "a": jax.random.normal(jax.random.PRNGKey(1), (m,))}
  return dict(name="synthetic", apply=two_layer_apply, params=params, X=X,
              y=y, loss="mse", target=1e-6, damping=1e-3)


def digits(loss, quick):
  from sklearn.datasets import load_digits
  data = load_digits()
  n = 64 if quick else 256
  X = jnp.asarray((data.data[:n] / 16.0).astype(np.float32))
  y = jax.nn.one_hot(data.target[:n], 10)
  hidden = 256
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"W1": jax.random.normal(k1, (64, hidden)) * np.sqrt(2 / 64),
            "b1": jnp.zeros(hidden),
            "W2": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
            "b2": jnp.zeros(10)}
  if loss == "mse":
    return dict(name="digits-mse", apply=mlp_apply, params=params, X=X, y=y,
                loss="mse", target=1e-5, damping=1e-3)
  return dict(name="digits-ce", apply=mlp_apply, params=params, X=X, y=y,
              loss="cross_entropy", target=1e-3, damping=1.0)


def loss_fn(prob):
  apply, X, y = prob["apply"], prob["X"], prob["y"]
  if prob["loss"] == "mse":
    return lambda p: 0.5 * jnp.sum(jnp.square(apply(p, X) - y)) / X.shape[0]
  return lambda p: jnp.mean(-jnp.sum(y * jax.nn.log_softmax(apply(p, X)), -1))


def run_curve(step, state, loss, max_iters, max_seconds, target):
  """Loss after each step and cumulative step time; stops at the target."""
  losses, times, elapsed = [float(loss(state[0]))], [0.0], 0.0
  for _ in range(max_iters):
    t0 = time.perf_counter()
    try:
      state = step(state)
    except SingularGramError:  # the solve broke down: the run stops here
      break
    jax.block_until_ready(state)
    elapsed += time.perf_counter() - t0
    losses.append(float(loss(state[0])))
    times.append(elapsed)
    if losses[-1] <= target or not np.isfinite(losses[-1]) or elapsed > max_seconds:
      break
  return losses, times


def reached(curve, target):
  losses, times = curve
  for i, l in enumerate(losses):
    if l <= target:
      return i, times[i]
  return None, None


def ggn_curve(prob, solver, args, sketch_size=None, refresh=1, cap=200):
  opt = gram_gauss_newton(prob["apply"], solver=solver, loss=prob["loss"],
                          damping=prob["damping"], cg_max_iters=cap,
                          sketch_size=sketch_size, nystrom_refresh=refresh)
  info_log = []

  def step(s):
    p, st = s
    p, st, info = opt.step(p, st, prob["X"], prob["y"])
    info_log.append(dict(cg_iters=int(info["cg_iters"]),
                         solve_time_s=float(info["solve_time_s"])))
    return p, st

  # compile outside the timed loop (two steps: a kept Nystrom factor makes
  # the second step's state, and so its program, differ from the first's)
  try:
    p, st, _ = opt.step(prob["params"], opt.init(None), prob["X"], prob["y"])
    jax.block_until_ready(opt.step(p, st, prob["X"], prob["y"]))
  except SingularGramError:
    pass  # compiled; the timed run below stops at the same step
  info_log.clear()
  curve = run_curve(step, (prob["params"], opt.init(None)), loss_fn(prob),
                    args.ggn_iters, args.max_seconds, prob["target"])
  extra = dict(cg_iters=[i["cg_iters"] for i in info_log],
               solve_s=[round(i["solve_time_s"], 4) for i in info_log])
  return curve, extra


def first_order_curve(prob, make_tx, lrs, args):
  loss = loss_fn(prob)
  best = None
  for lr in lrs:
    tx = make_tx(lr)

    @jax.jit
    def step(s, tx=tx):
      p, o = s
      g = jax.grad(loss)(p)
      u, o = tx.update(g, o, p)
      return optax.apply_updates(p, u), o

    state = (prob["params"], tx.init(prob["params"]))
    jax.block_until_ready(step(state))
    curve = run_curve(step, state, loss, args.first_order_iters,
                      args.max_seconds, prob["target"])
    it, _ = reached(curve, prob["target"])
    final = curve[0][-1] if np.isfinite(curve[0][-1]) else np.inf
    key = (0, it) if it is not None else (1, final)
    if best is None or key < best[0]:
      best = (key, curve, lr)
  return best[1], dict(lr=best[2])


def jaxopt_curve(prob, args):
  import jaxopt
  apply, X, y = prob["apply"], prob["X"], prob["y"]
  scale = 1.0 / np.sqrt(X.shape[0])
  solver = jaxopt.GaussNewton(
      residual_fun=lambda p: ((apply(p, X) - y) * scale).reshape(-1),
      maxiter=1)
  update = jax.jit(solver.update)

  def step(s):
    p, st = s
    return update(p, st)

  state = (prob["params"], solver.init_state(prob["params"]))
  jax.block_until_ready(step(state))
  return run_curve(step, state, loss_fn(prob), args.ggn_iters,
                   args.max_seconds, prob["target"]), {}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small sizes (~30 s)")
  p.add_argument("--ggn-iters", type=int, default=30)
  p.add_argument("--first-order-iters", type=int, default=2000)
  p.add_argument("--max-seconds", type=float, default=30.0,
                 help="per run")
  p.add_argument("--sketch", type=int, default=128,
                 help="sketch size of the equal-size preconditioner rows")
  p.add_argument("--json", default=None)
  p.add_argument("--png", default=None)
  args = p.parse_args(argv)
  if args.quick:
    args.first_order_iters, args.max_seconds = 300, 10.0
  try:
    import jaxopt  # noqa: F401
    have_jaxopt = True
  except ImportError:
    have_jaxopt = False
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; jaxopt "
        f"{'installed' if have_jaxopt else 'not installed (skipped)'}")
  problems = [synthetic(args.quick), digits("mse", args.quick),
              digits("cross_entropy", args.quick)]
  results = {}
  for prob in problems:
    nparams = sum(x.size for x in jax.tree_util.tree_leaves(prob["params"]))
    print(f"\n{prob['name']}: n={prob['X'].shape[0]}, outputs "
          f"{int(np.prod(prob['y'].shape))}, p={nparams}, loss {prob['loss']}, "
          f"target {prob['target']:g}")
    sys.stdout.flush()
    curves = {}
    for solver in ("cholesky", "cg", "sketched_cg"):
      curves[f"ggn-{solver}"] = ggn_curve(prob, solver, args)
    # the two preconditioners at one sketch size: Gaussian vs Nystrom
    for solver in ("sketched_cg", "nystrom_cg"):
      curves[f"ggn-{solver}(s={args.sketch})"] = ggn_curve(
          prob, solver, args, sketch_size=args.sketch)
    # the Nystrom factor built every 10 steps, reused between
    curves[f"ggn-nystrom_cg(s={args.sketch},r=10)"] = ggn_curve(
        prob, "nystrom_cg", args, sketch_size=args.sketch, refresh=10)
    curves["adam"] = first_order_curve(
        prob, optax.adam, [1e-3, 3e-3, 1e-2, 3e-2], args)
    curves["sgd-momentum"] = first_order_curve(
        prob, lambda lr: optax.sgd(lr, momentum=0.9), [1e-2, 3e-2, 0.1, 0.3, 1.0],
        args)
    if have_jaxopt and prob["loss"] == "mse":
      curves["jaxopt-gauss-newton"] = jaxopt_curve(prob, args)
    ggn = [reached(curves[k][0], prob["target"]) for k in curves
           if k.startswith("ggn-")]
    ggn = [r for r in ggn if r[0] is not None]
    # ratios against the best GGN solver (fewest iterations, least time)
    ref = (min(r[0] for r in ggn), min(r[1] for r in ggn)) if ggn else (None, None)
    print(f"{'method':<28}{'iters':>7}{'seconds':>10}{'final loss':>13}"
          f"{'iters/ggn':>11}{'time/ggn':>10}  notes (ratios: vs the best GGN)")
    rows = {}
    for name, (curve, extra) in curves.items():
      it, t = reached(curve, prob["target"])
      ratio_i = f"{it / ref[0]:.1f}x" if it is not None and ref[0] else "-"
      ratio_t = f"{t / ref[1]:.1f}x" if t is not None and ref[1] else "-"
      note = ""
      if "lr" in extra:
        note = f"lr={extra['lr']}"
      if it is None and "cg_iters" in extra and \
          len(extra["cg_iters"]) < args.ggn_iters and curve[0][-1] > prob["target"]:
        note = "the solve broke down (SingularGramError) after " \
               f"{len(extra['cg_iters'])} steps; "
      if "cg_iters" in extra and any(extra["cg_iters"]):
        note += (f"CG iters/step {int(np.mean(extra['cg_iters']))}, solve "
                f"{1e3 * np.mean(extra['solve_s']):.1f} ms/step")
      elif "solve_s" in extra:
        note = f"solve {1e3 * np.mean(extra['solve_s']):.1f} ms/step"
      it_s = str(it) if it is not None else f">{len(curve[0]) - 1}"
      t_s = f"{t:.3f}" if t is not None else f">{curve[1][-1]:.2f}"
      print(f"{name:<28}{it_s:>7}{t_s:>10}{curve[0][-1]:>13.3e}{ratio_i:>11}"
            f"{ratio_t:>10}  {note}")
      rows[name] = dict(iters=it, seconds=t, losses=curve[0], times=curve[1],
                        **extra)
    results[prob["name"]] = rows
    sys.stdout.flush()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  if args.png:
    plot(results, args.png)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8))
  for col, (name, rows) in enumerate(results.items()):
    for method, r in rows.items():
      losses = np.maximum(np.asarray(r["losses"], float), 1e-16)
      axes[0, col].semilogy(np.arange(len(losses)), losses, label=method)
      axes[1, col].semilogy(r["times"], losses, label=method)
    axes[0, col].set_title(name)
    axes[0, col].set_xlabel("iteration")
    axes[1, col].set_xlabel("seconds")
    axes[0, col].set_xscale("symlog")
    for ax in axes[:, col]:
      ax.set_ylabel("training loss")
      ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
