"""Train a wide shifted-ReLU layer through the firing-neuron index.

A ``SparseMLP`` of 65,536 neurons fits a regression target on 256 points.
With threshold b = 3.5 only a few neurons fire per point, so each step finds
the union of firing neurons (O(m)), reads their stored correlations, and
updates only their weights and correlations. The same steps are run densely
(plain ``jax.jit``) alongside, and the two runs are compared.

  python examples/sparse_training.py [--steps 30] [--width 65536]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.models.sparse_mlp import SparseMLP, SparseSGD, dense_sgd_step


def data(n, d, seed=0):
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(n, d)).astype(np.float32)
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  u = rng.normal(size=(d,)).astype(np.float32)
  y = 0.05 * np.sin(3.0 * X @ u)
  return jnp.asarray(X), jnp.asarray(y.astype(np.float32))


def run(steps=30, width=65536, n=256, d=32, threshold=3.5, lr=2.0,
        verbose=True):
  """Returns per-step sparse losses, union fractions, median step times
  (sparse, dense) and the largest weight difference from the dense run."""
  X, y = data(n, d)
  model = SparseMLP(width=width, threshold=threshold)
  variables = model.init(jax.random.PRNGKey(0), X)
  opt = SparseSGD(model, learning_rate=lr)
  t0 = time.perf_counter()
  index = opt.init(variables, X)
  jax.block_until_ready(index)
  if verbose:
    print(f"index of {n} points x {width} neurons built in "
          f"{time.perf_counter() - t0:.2f} s; union capacity {opt.capacity}")
  W, a = variables["params"]["kernel"], variables["constants"]["a"]
  losses, unions, t_sparse, t_dense = [], [], [], []
  for step in range(steps):
    t0 = time.perf_counter()
    index, loss, info = opt.step(index, variables, y)
    jax.block_until_ready(index)
    t_sparse.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    W, dense_loss = dense_sgd_step(W, a, X, y, threshold, lr)
    jax.block_until_ready(W)
    t_dense.append(time.perf_counter() - t0)
    losses.append(float(loss))
    unions.append(int(info.union) / width)
    if verbose and (step % 5 == 0 or step == steps - 1):
      print(f"step {step:3d}  loss {float(loss):.6e} (dense {float(dense_loss):.6e})"
            f"  union firing {100 * unions[-1]:.2f}% of neurons"
            f"  pairs {int(info.pairs)}")
  diff = float(jnp.max(jnp.abs(index.W - W)))
  ts, td = float(np.median(t_sparse[2:])), float(np.median(t_dense[2:]))
  if verbose:
    print(f"median step: sparse {1e3 * ts:.2f} ms, dense {1e3 * td:.2f} ms "
          f"({td / ts:.1f}x); max |W_sparse - W_dense| = {diff:.2e}")
  trained = SparseSGD.variables(variables, index)
  return losses, unions, (ts, td), diff, trained


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--width", type=int, default=65536)
  args = p.parse_args()
  run(steps=args.steps, width=args.width)


if __name__ == "__main__":
  main()
