"""k-means++ seeding, fast and plain, and Lloyd's refinement.

``kmeans_plusplus(key, X, k)`` picks k rows of ``X`` as centers by D^2
sampling (each next center drawn with probability proportional to its
squared distance to the nearest center chosen so far), with greedy
candidate trials as scikit-learn does (``2 + ln k`` candidates per center,
the one that lowers the potential most is kept).

``method="fast"`` follows FastKmeans++ (Cohen-Addad, Lattanzi,
Norouzi-Fard, Sohler, Svensson; the abstract in ../shared/SEEDS.md) in its
two ideas, the cheap proposal and the exact correction:

* **Dimension reduction for the distance computations.** The points are
  projected once to ``m = proj_dim`` dimensions by a Gaussian map (O(ndm)),
  and the running squared distances D~^2 to the nearest center, which
  every new center updates for all points, are kept in that space: O(nm)
  per update instead of O(nd).
* **Rejection sampling to exact D^2.** A candidate is proposed with
  probability proportional to D~^2, its exact D^2 in the original space is
  computed against the chosen centers (O(kd), one point), and it is kept
  with probability D^2 / (beta D~^2), where beta bounds the ratio: each
  accepted candidate is then an exact D^2 sample, as in the paper.

Where this deviates from the paper: the paper's proposal comes from a
multi-tree embedding whose distances dominate the true ones, so a new
center updates only the points whose tree distance changes and beta is a
hard bound; here the proposal is the projected D~^2, every point is
updated per center (O(nm), dense and vectorised), and beta is the
chi-square quantile that bounds the projection's shrinkage of the n k
point-center vectors with probability ``1 - beta_delta`` (a violation
clips one acceptance probability at 1). The candidate trials' potentials
are evaluated in the projected space too (O(nm) each). Total
O(ndm + nmkL) for L trials per center, against O(ndkL) for the plain
algorithm.

``method="exact"`` is the plain algorithm in the original space, the
reference. ``lloyd`` refines centers; ``kmeans_cost`` is the potential
(sum of squared distances to the nearest center).
"""

from __future__ import annotations

import math

import jax
import numpy as np

METHODS = ("fast", "exact")
_CHUNK = 8192  # rows per block in the full-dimension distance computations
_MAX_PROPOSALS = 1_000_000  # per sample, before giving up


def _check(X, k: int) -> np.ndarray:
  X = np.asarray(X, np.float32)
  if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
    raise ValueError(f"X must be a non-empty [n, d] array; got shape "
                     f"{tuple(X.shape)}")
  n = X.shape[0]
  if not isinstance(k, (int, np.integer)) or k < 1 or k > n:
    raise ValueError(f"k (={k!r}) must be an integer in [1, n={n}]")
  return X


def _seed(key) -> np.random.Generator:
  """A NumPy generator drawn from a JAX key (the loop is sequential)."""
  bits = np.asarray(jax.random.key_data(key) if jax.dtypes.issubdtype(
      getattr(key, "dtype", None), jax.dtypes.prng_key) else key)
  return np.random.default_rng(bits.astype(np.uint64).tolist())


def _sq_dist(points: np.ndarray, c: np.ndarray,
             sq: np.ndarray) -> np.ndarray:
  """|points_i - c|^2 for every row, given sq = |points_i|^2."""
  return np.maximum(sq - 2.0 * (points @ c) + float(c @ c), 0.0)


def kmeans_cost(X, centers) -> float:
  """Sum over the points of the squared distance to the nearest center."""
  X = np.asarray(X, np.float32)
  C = np.asarray(centers, np.float32)
  cc = (C * C).sum(1)
  total = 0.0
  for a in range(0, X.shape[0], _CHUNK):
    x = X[a:a + _CHUNK]
    d2 = (x * x).sum(1)[:, None] - 2.0 * (x @ C.T) + cc[None, :]
    total += float(np.maximum(d2.min(1), 0.0).sum())
  return total


def lloyd(X, centers, iters: int = 10):
  """``iters`` Lloyd iterations from ``centers``: ``(centers, cost)``, the
  cost of the returned centers. An empty cluster keeps its center."""
  X = np.asarray(X, np.float32)
  C = np.array(centers, np.float32, copy=True)
  k = C.shape[0]
  for _ in range(iters):
    cc = (C * C).sum(1)
    sums = np.zeros_like(C, dtype=np.float64)
    counts = np.zeros(k, np.int64)
    for a in range(0, X.shape[0], _CHUNK):
      x = X[a:a + _CHUNK]
      d2 = (x * x).sum(1)[:, None] - 2.0 * (x @ C.T) + cc[None, :]
      lab = d2.argmin(1)
      np.add.at(sums, lab, x)
      counts += np.bincount(lab, minlength=k)
    full = counts > 0
    C[full] = (sums[full] / counts[full, None]).astype(np.float32)
  return C, kmeans_cost(X, C)


def _beta(n: int, k: int, m: int, delta: float) -> float:
  """An upper bound, with probability 1 - delta over the projection, on
  |v|^2 / |Pv|^2 for all n k point-center vectors v (P scaled so that
  E|Pv|^2 = |v|^2): one over the chi-square(m)/m quantile at delta/(nk)."""
  from scipy.stats import chi2
  q = chi2.ppf(delta / (n * k), m) / m
  return 1.0 / max(q, 1e-6)


class _Seeder:
  """The state of one seeding: chosen centers and the running distances."""

  def __init__(self, X, k, rng, proj_dim, beta_delta, exact):
    n, d = X.shape
    self.X, self.k, self.rng, self.exact = X, k, rng, exact
    if exact:
      self.Y = X
    else:
      m = int(proj_dim or min(d, 64))
      if m < 1:
        raise ValueError(f"proj_dim (={proj_dim!r}) must be >= 1")
      g = rng.standard_normal((d, m)).astype(np.float32) / np.sqrt(m)
      self.Y = np.ascontiguousarray(X @ g)
      self.beta = _beta(n, k, m, beta_delta)
    self.sq = (self.Y * self.Y).sum(1)
    self.centers = np.empty((k, d), np.float32)  # chosen rows, in order
    self.d2 = None  # D~^2 (the exact D^2 for the exact method)
    self.chosen: list[int] = []
    self.proposed = 0  # candidates drawn (fast: before rejection)

  def exact_d2(self, i: int) -> float:
    """D^2 of point i in the original space against the chosen centers."""
    diff = self.centers[:len(self.chosen)] - self.X[i]
    return float((diff * diff).sum(1).min())

  def proposal(self) -> np.ndarray:
    """The cumulative D~^2 weights the next center's candidates are drawn
    from (fixed until a center is added)."""
    cdf = np.cumsum(self.d2, dtype=np.float64)
    if cdf[-1] <= 0.0:
      distinct = len(np.unique(self.X[self.chosen], axis=0))
      raise ValueError(f"X has {distinct} distinct points, fewer than k "
                       f"(={self.k}): every point coincides with a center "
                       "already chosen")
    return cdf

  def sample(self, cdf: np.ndarray) -> int:
    """One exact D^2 sample (``cdf`` from ``proposal``)."""
    for _ in range(_MAX_PROPOSALS):
      self.proposed += 1
      i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], "right"))
      i = min(i, len(cdf) - 1)
      if self.exact:
        return i
      prop = float(self.d2[i])
      if prop <= 0.0:
        continue
      if self.rng.random() * self.beta * prop <= self.exact_d2(i):
        return i
    raise RuntimeError(f"{_MAX_PROPOSALS} proposals without one accepted: "
                       "the projected distances no longer reflect the true "
                       "ones (use method='exact' or a larger proj_dim)")

  def add(self, i: int, dist: np.ndarray | None = None) -> None:
    if dist is None:
      dist = _sq_dist(self.Y, self.Y[i], self.sq)
    # copies of the new center: exactly 0, not the rounding of the
    # expanded square (which would let a copy be drawn again)
    tol = 1e-5 * (self.sq + float(self.Y[i] @ self.Y[i])) + 1e-30
    near = np.flatnonzero(dist <= tol)
    if near.size:
      same = near[(self.X[near] == self.X[i]).all(1)]
      if same.size:
        dist = dist.copy()
        dist[same] = 0.0
    self.d2 = dist if self.d2 is None else np.minimum(self.d2, dist)
    self.centers[len(self.chosen)] = self.X[i]
    self.chosen.append(i)


def kmeans_plusplus(key, X, k: int, *, trials: int | None = None,
                    method: str = "fast", proj_dim: int | None = None,
                    beta_delta: float = 0.01):
  """k-means++ seeding: ``(centers [k, d], indices [k])``.

  Args:
    key: a JAX PRNG key (the draws are made by a NumPy generator seeded
      from it: the loop over centers is sequential).
    X: ``[n, d]`` points.
    k: centers to choose (``1 <= k <= n``; at least k distinct points).
    trials: candidates per center (the one lowering the potential most is
      kept); default ``2 + int(ln k)`` as scikit-learn's.
    method: ``"fast"`` (projected distances, rejection-corrected samples;
      see the module doc) or ``"exact"`` (the plain algorithm).
    proj_dim: the projection's dimension for ``"fast"`` (default
      ``min(d, 64)``).
    beta_delta: the probability that the rejection bound fails somewhere.

  Raises:
    ValueError: k out of range, fewer than k distinct points, an unknown
      method, a bad ``trials`` or ``proj_dim``.
  """
  X = _check(X, k)
  if method not in METHODS:
    raise ValueError(f"method (={method!r}) must be one of {METHODS}")
  if trials is None:
    trials = 2 + int(math.log(k))
  if not isinstance(trials, (int, np.integer)) or trials < 1:
    raise ValueError(f"trials (={trials!r}) must be an integer >= 1")
  if not 0.0 < beta_delta < 1.0:
    raise ValueError(f"beta_delta (={beta_delta!r}) must lie in (0, 1)")
  rng = _seed(key)
  s = _Seeder(X, k, rng, proj_dim, beta_delta, method == "exact")
  s.add(int(rng.integers(X.shape[0])))
  for _ in range(1, k):
    cdf = s.proposal()
    cands = np.array([s.sample(cdf) for _ in range(trials)])
    # every trial's distances in one product (the points read once)
    yc = s.Y[cands]
    dist = np.maximum(s.sq[:, None] - 2.0 * (s.Y @ yc.T)
                      + (yc * yc).sum(1)[None, :], 0.0)
    pots = np.minimum(s.d2[:, None], dist).sum(0)
    j = int(pots.argmin())
    s.add(int(cands[j]), np.ascontiguousarray(dist[:, j]))
  return s.centers, np.asarray(s.chosen, np.int64)
