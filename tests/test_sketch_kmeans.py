"""k-means++ seeding (alpa_py.sketch.kmeans)."""

import jax
import numpy as np
import pytest
from scipy.stats import chisquare

from alpa_py.sketch import kmeans_cost, kmeans_plusplus, lloyd
from alpa_py.sketch.kmeans import _beta, _Seeder


def _mixture(n=600, d=16, comps=6, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(comps, d)) * 4
  return (c[rng.integers(comps, size=n)] + rng.normal(size=(n, d))).astype(
      np.float32)


def _exact_d2(X, chosen):
  diff = X[:, None, :] - X[chosen][None, :, :]
  return (diff ** 2).sum(-1).min(1)


def test_rejection_samples_follow_exact_d2():
  """The fast proposal (projected to 4 of 16 dims, so visibly distorted)
  corrected by rejection matches exact D^2 sampling (chi-square); the
  uncorrected proposal does not."""
  X = _mixture(n=40, d=16, comps=4, seed=1)
  rng = np.random.default_rng(0)
  s = _Seeder(X, 5, rng, proj_dim=4, beta_delta=0.01, exact=False)
  for i in (0, 7, 21):
    s.add(i)
  p = _exact_d2(X.astype(np.float64), s.chosen)
  live = p > 0
  draws = 6000
  cdf = s.proposal()
  got = np.bincount([s.sample(cdf) for _ in range(draws)], minlength=len(X))
  expect = draws * p / p.sum()  # zero where not live
  assert chisquare(got[live], expect[live]).pvalue > 1e-3
  assert got[~live].sum() == 0
  # the proposal alone is another distribution, which the same test sees
  q = s.d2.astype(np.float64) / s.d2.sum(dtype=np.float64)
  raw = np.bincount(rng.choice(len(X), size=draws, p=q), minlength=len(X))
  assert chisquare(raw[live], expect[live]).pvalue < 1e-6


def test_fast_seeding_picks_distinct_rows_at_the_plain_algorithms_cost():
  X = _mixture(n=3000, d=32, comps=12, seed=2)
  cost = {"fast": [], "exact": []}
  for method in cost:
    for seed in range(6):
      c, idx = kmeans_plusplus(jax.random.PRNGKey(seed), X, 12,
                               method=method)
      assert c.shape == (12, 32) and len(set(idx.tolist())) == 12
      np.testing.assert_array_equal(c, X[idx])
      cost[method].append(kmeans_cost(X, c))
  assert np.mean(cost["fast"]) <= 1.2 * np.mean(cost["exact"])


def test_same_key_same_centers():
  X = _mixture()
  a = kmeans_plusplus(jax.random.PRNGKey(3), X, 5)[1]
  b = kmeans_plusplus(jax.random.PRNGKey(3), X, 5)[1]
  np.testing.assert_array_equal(a, b)


def test_lloyd_never_raises_the_cost():
  X = _mixture()
  c, _ = kmeans_plusplus(jax.random.PRNGKey(0), X, 6)
  before = kmeans_cost(X, c)
  c2, after = lloyd(X, c, iters=5)
  assert after <= before * (1 + 1e-6)
  assert after == pytest.approx(kmeans_cost(X, c2))


def test_beta_bounds_the_projection_shrinkage():
  rng = np.random.default_rng(0)
  n, k, m, d = 200, 10, 8, 64
  v = rng.normal(size=(n * k, d))
  g = rng.normal(size=(d, m)) / np.sqrt(m)
  ratio = (v ** 2).sum(1) / ((v @ g) ** 2).sum(1)
  assert ratio.max() <= _beta(n, k, m, 0.01)


def test_bad_input_is_named():
  X = _mixture(n=10)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"k \(=11\) must be an integer in "
                     r"\[1, n=10\]"):
    kmeans_plusplus(key, X, 11)
  dup = np.repeat(X[:3], 4, axis=0)
  with pytest.raises(ValueError, match=r"X has 3 distinct points, fewer than "
                     r"k \(=5\)"):
    kmeans_plusplus(key, dup, 5)
  with pytest.raises(ValueError, match="method"):
    kmeans_plusplus(key, X, 3, method="tree")
  with pytest.raises(ValueError, match="trials"):
    kmeans_plusplus(key, X, 3, trials=0)
