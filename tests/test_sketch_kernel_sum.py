"""KernelSum: exact sums, estimates within eps, the dynamic operations,
robustness to an adaptive adversary, bad input."""

import numpy as np
import pytest

from alpa_py.sketch import kernel_sum as kmod
from alpa_py.sketch.kernel_sum import KernelSum


def _mixture(n, d, k=50, seed=0):
  rng = np.random.default_rng(seed)
  C = rng.normal(size=(k, d)) * 3
  return (C[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(
      np.float32), rng


def _brute(X, Y, kernel, h):
  X, Y = X.astype(np.float64), Y.astype(np.float64)
  if kernel == "laplacian":
    d = np.abs(X[None] - Y[:, None]).sum(-1)
    return np.exp(-d / h).mean(1)
  d2 = ((X[None] - Y[:, None]) ** 2).sum(-1)
  if kernel == "gaussian":
    return np.exp(-d2 / (2 * h * h)).mean(1)
  return np.exp(-np.sqrt(d2) / h).mean(1)


@pytest.mark.parametrize("kernel,h", [("gaussian", 3.0), ("exponential", 1.5),
                                      ("laplacian", 6.0)])
def test_estimates_within_eps_and_exact_sums(kernel, h):
  X, rng = _mixture(20000, 16)
  ks = KernelSum(kernel, h, eps=0.1, delta=0.1, seed=0)
  ks.insert(X)
  Y = X[rng.integers(len(X), size=60)] + 0.2 * rng.normal(
      size=(60, 16)).astype(np.float32)
  exact = ks.query_exact(Y)
  np.testing.assert_allclose(exact, _brute(X, Y, kernel, h), rtol=1e-4)
  est = ks.query(Y)
  assert (np.abs(est / exact - 1) <= 0.1).mean() >= 0.9
  assert ks.last_evaluations < len(X) // 2


def test_insert_delete_replace_keep_the_set():
  X, rng = _mixture(6000, 8, k=20, seed=1)
  ks = KernelSum("gaussian", 2.0, eps=0.1, delta=0.1, seed=0)
  ids = ks.insert(X)
  assert list(ids) == list(range(6000))
  live = dict(zip(ids.tolist(), X))
  gone = rng.choice(6000, 1500, replace=False)
  ks.delete(gone)
  for i in gone.tolist():
    del live[i]
  moved = np.array([i for i in range(0, 6000, 7) if i in live])
  new_pts = X[rng.integers(6000, size=len(moved))] + 0.5
  ks.replace(moved, new_pts)
  for i, p in zip(moved.tolist(), new_pts):
    live[i] = p
  more = X[:700] - 0.3
  new_ids = ks.insert(more)
  assert set(new_ids[:700].tolist()) <= set(gone.tolist())  # ids reused
  for i, p in zip(new_ids.tolist(), more):
    live[i] = p
  assert len(ks) == len(live)
  assert int(ks._count.sum()) == len(live)  # every live point in a bucket
  P = np.stack(list(live.values()))
  Y = P[rng.integers(len(P), size=40)]
  exact = ks.query_exact(Y)
  np.testing.assert_allclose(exact, _brute(P, Y, "gaussian", 2.0), rtol=1e-4)
  assert (np.abs(ks.query(Y) / exact - 1) <= 0.1).mean() >= 0.9


def test_adaptive_adversary_breaks_a_fixed_sample_not_kernel_sum():
  X, rng = _mixture(20000, 16)
  h = 4.0
  ks = KernelSum("gaussian", h, eps=0.1, delta=0.1, seed=3)
  ks.insert(X)
  fixed = kmod.FixedSampleKDE(X, "gaussian", h, 4000, seed=0)
  # the fixed sample's error bound: its 90th percentile on queries chosen
  # in advance
  Y = X[rng.integers(len(X), size=300)]
  bound = np.quantile(np.abs(fixed.query(Y) / ks.query_exact(Y) - 1), 0.9)
  attacked = kmod.adaptive_attack(fixed, X, "gaussian", h, queries=1000,
                                  seed=1)
  assert (attacked > 2 * bound).mean() >= 0.10
  robust = kmod.adaptive_attack(ks, X, "gaussian", h, queries=1000, seed=1)
  assert (robust <= 0.1).mean() >= 0.90


def test_bad_input():
  with pytest.raises(ValueError, match=r"bandwidth \(=0\) must be > 0"):
    KernelSum("gaussian", 0)
  with pytest.raises(ValueError, match=r"eps \(=1.5\) must lie in \(0, 1\)"):
    KernelSum("gaussian", 1.0, eps=1.5)
  with pytest.raises(ValueError, match=r"delta \(=0\) must lie in \(0, 1\)"):
    KernelSum("gaussian", 1.0, delta=0)
  with pytest.raises(ValueError, match=r"kernel \(='cosine'\) must be one"):
    KernelSum("cosine", 1.0)
  ks = KernelSum("gaussian", 1.0)
  with pytest.raises(ValueError, match=r"query on an empty set"):
    ks.query(np.zeros((1, 3)))
  ids = ks.insert(np.eye(3, dtype=np.float32))
  with pytest.raises(KeyError, match=r"unknown id\(s\) \[7\]"):
    ks.delete([7])
  ks.delete(ids[:1])
  with pytest.raises(KeyError, match=r"unknown id\(s\) \[0\]"):
    ks.delete([0])
  with pytest.raises(ValueError, match=r"points have dimension 4; the set "
                     r"has 3"):
    ks.insert(np.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"queries have shape \(1, 2\)"):
    ks.query(np.zeros((1, 2)))
