"""A dynamic kernel-sum structure: ``(1/|X|) sum_x f(x, y)`` for queries
``y``, touching a small part of ``X``, under insertions, deletions and
replacements, with a per-query guarantee for queries chosen however the
caller likes, earlier answers included.

Buckets with kernel bounds, sampled as strata (written here; see "Where
this deviates" below):

* **Buckets.** Every point is hashed to its nearest of ``C`` centres
  (k-means on a sample of the set: this package's k-means++ seeding and a
  few Lloyd iterations; ``C`` about ``sqrt(n)``). A bucket keeps its
  members (one flat array with room to grow), its count and a radius
  ``r_c`` bounding every member's distance to the centre (it only grows
  between rebuilds).
* **Bounds.** For a query ``y`` at distance ``D_c`` from centre ``c``,
  every member's kernel value lies in ``[f(D_c + r_c), f(max(D_c - r_c,
  0))]`` (the triangle inequality; in l1 for the Laplacian kernel). A
  bucket whose upper bound is zero is skipped; a small bucket is summed
  exactly.
* **Stratified sampling.** Every other bucket is a stratum: a pilot of
  ``pilot`` uniform draws each, then Neyman's allocation (more draws where
  ``n_c s_c / sqrt(m_c)`` is largest; a bucket is summed exactly once that
  is cheaper) until the normal bound ``z_{1-delta/2} sqrt(sum n_c^2 s_c^2
  / m_c)`` is within ``eps`` of the estimate. Each stratum's variance is
  taken no smaller than ``range_floor`` times its squared bound range, so
  a pilot that misses a bucket's few large values cannot stop the
  sampling early. The estimate is unbiased; the bound is a central-limit
  one (``benchmarks/kernel_sum.py`` measures the share of queries within
  ``eps``).
* **Robustness.** Buckets and bounds are the same for every query and only
  the draws are random; each query's draws come from a fresh generator
  (seeded from the operating system's entropy unless ``seed`` is given),
  so an answer carries no information about the next query's error.
  ``robust=False`` reuses one fixed generator state for every query's
  draws: the estimator an adaptive adversary can learn
  (:func:`adaptive_attack`).

Dynamic: ids are stable (a deleted id is reused by a later insert). An
insert hashes the point to its nearest centre (O(C d)) and widens that
bucket's radius if needed; a delete swaps the id out of its bucket (O(1));
a replace is both. After ``rebuild_fraction * n`` changes the buckets are
rebuilt (new centres, tight radii).

Where this deviates from the hashing-based estimators of the source papers
(random multi-resolution LSH buckets with importance weights): the
buckets here are data-dependent (nearest-centre hashing) and bounded. A
sketch with p-stable LSH strata (docs/research/kernel_sum_lsh_notes.md) was
unbiased but kept only 60-88% of queries within 0.1 on clustered data in
d=32, where random projections separate near from far points poorly.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from alpa_py.sketch.kmeans import kmeans_plusplus, lloyd

KERNELS = ("gaussian", "exponential", "laplacian")


class KernelSum:
  """See the module doc.

  Args:
    kernel: ``gaussian`` exp(-|x-y|^2 / (2 h^2)), ``exponential``
      exp(-|x-y|_2 / h), ``laplacian`` exp(-|x-y|_1 / h).
    bandwidth: ``h`` > 0.
    eps, delta: relative error at most ``eps`` with probability at least
      ``1 - delta`` per query (both in (0, 1)).
    buckets: number of centres (default about ``sqrt(n)`` at each build).
    pilot: draws per bucket before the allocation; ``range_floor``: see
      the module doc; ``max_evaluations``: the per-query cap on kernel
      evaluations (default a quarter of the set).
    fit_sample: points the centres are fitted on at a build.
    min_build: no buckets are built while fewer points than this are live
      (a query builds them).
  """

  def __init__(self, kernel: str = "gaussian", bandwidth: float = 1.0,
               eps: float = 0.1, delta: float = 0.1, *,
               buckets: int | None = None,
               fit_sample: int = 32768, rebuild_fraction: float = 0.25,
               pilot: int = 8, max_evaluations: int | None = None,
               range_floor: float = 0.01, robust: bool = True,
               seed: int | None = None, min_build: int = 1):
    if kernel not in KERNELS:
      raise ValueError(f"kernel (={kernel!r}) must be one of {KERNELS}")
    if not bandwidth > 0:
      raise ValueError(f"bandwidth (={bandwidth}) must be > 0")
    for name, v in (("eps", eps), ("delta", delta)):
      if not 0 < v < 1:
        raise ValueError(f"{name} (={v}) must lie in (0, 1)")
    if pilot < 2:
      raise ValueError(f"pilot (={pilot}) must be >= 2")
    if buckets is not None and buckets < 1:
      raise ValueError(f"buckets (={buckets}) must be >= 1")
    self.kernel, self.h = kernel, float(bandwidth)
    self.eps, self.delta = float(eps), float(delta)
    self.buckets = buckets
    self.fit_sample, self.rebuild_fraction = fit_sample, rebuild_fraction
    self.robust = robust
    self.min_build = max(int(min_build), 1)
    self.pilot, self.range_floor = pilot, range_floor
    self._max_evals = max_evaluations
    self._z = NormalDist().inv_cdf(1 - delta / 2)
    self._entropy = np.random.SeedSequence(seed)
    self._fixed = self._entropy.generate_state(2)
    self._X = None
    self._n = 0  # rows in use
    self._alive = np.zeros(0, bool)
    self._sq = np.zeros(0)
    self._free: list = []
    self._num_live = 0
    self._centers = None
    self._changes = 0
    self.last_evaluations = 0  # kernel evaluations of the last query

  # -- storage ---------------------------------------------------------------

  def __len__(self) -> int:
    return self._num_live

  def _check_points(self, points):
    P = np.asarray(points, np.float32)
    if P.ndim == 1:
      P = P[None]
    if P.ndim != 2 or P.shape[1] < 1:
      raise ValueError(f"points must be [m, d]; got shape {P.shape}")
    if self._X is not None and P.shape[1] != self._X.shape[1]:
      raise ValueError(f"points have dimension {P.shape[1]}; the set has "
                       f"{self._X.shape[1]}")
    if not np.all(np.isfinite(P)):
      raise ValueError("points must be finite")
    return P

  def _grow(self, rows):
    cap = 0 if self._X is None else self._X.shape[0]
    if rows <= cap:
      return
    new = max(rows, 2 * cap, 1024)
    for name, shape, dtype in (("_X", (new, self._dim), np.float32),
                               ("_alive", (new,), bool),
                               ("_sq", (new,), np.float64),
                               ("_bucket", (new,), np.int64),
                               ("_slot", (new,), np.int64)):
      arr = np.zeros(shape, dtype)
      old = getattr(self, name, None)
      if old is not None and cap:
        arr[:cap] = old[:cap]
      setattr(self, name, arr)

  def _check_ids(self, ids):
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    bad = ids[(ids < 0) | (ids >= self._n)]
    if len(bad) == 0:
      bad = ids[~self._alive[ids]]
    if len(bad):
      raise KeyError(f"unknown id(s) {bad[:5].tolist()} (deleted, or never "
                     f"inserted)")
    if len(np.unique(ids)) != len(ids):
      raise KeyError("an id is given twice")
    return ids

  def insert(self, points) -> np.ndarray:
    """Adds points; returns their ids."""
    P = self._check_points(points)
    if self._X is None:
      self._dim = P.shape[1]
    m = P.shape[0]
    reuse = [self._free.pop() for _ in range(min(m, len(self._free)))]
    fresh = np.arange(self._n, self._n + m - len(reuse))
    ids = np.concatenate([np.asarray(reuse, np.int64), fresh]).astype(
        np.int64)
    self._n += len(fresh)
    self._grow(self._n)
    self._X[ids] = P
    self._sq[ids] = (P.astype(np.float64) ** 2).sum(1)
    self._alive[ids] = True
    self._num_live += m
    if self._centers is None and self._num_live < self.min_build:
      pass  # small: buckets wait (a query builds them)
    elif self._centers is None or self._changes + m > max(
        64, self.rebuild_fraction * self._num_live):
      self.rebuild()
    else:
      self._add_to_buckets(ids)
      self._changes += m
    return ids

  def delete(self, ids) -> None:
    """Removes points by id (an unknown id is an error)."""
    ids = self._check_ids(ids)
    for i in ids.tolist():
      self._alive[i] = False
      if self._centers is not None:
        self._remove_from_bucket(i)
      self._free.append(i)
    self._num_live -= len(ids)
    self._changes += len(ids)

  def replace(self, ids, points) -> None:
    """Moves the points ``ids`` to ``points`` (ids kept)."""
    ids = self._check_ids(ids)
    P = self._check_points(points)
    if P.shape[0] != len(ids):
      raise ValueError(f"{len(ids)} ids but {P.shape[0]} points")
    if self._centers is not None:
      for i in ids.tolist():
        self._remove_from_bucket(i)
    self._X[ids] = P
    self._sq[ids] = (P.astype(np.float64) ** 2).sum(1)
    if self._centers is not None:
      self._add_to_buckets(ids)
    self._changes += len(ids)

  # -- buckets ---------------------------------------------------------------

  def _dist_to(self, P, centers, csq):
    """``[m, C]`` distances (l2, or l1 for the Laplacian kernel)."""
    if self.kernel == "laplacian":
      return np.abs(P[:, None, :] - centers[None]).sum(-1)
    d2 = (P.astype(np.float64) ** 2).sum(1)[:, None] - 2.0 * (
        P @ centers.T) + csq[None, :]
    return np.sqrt(np.maximum(d2, 0.0))

  def _nearest(self, P, chunk=8192):
    """Nearest centre (by l2) and the distance in the kernel's metric."""
    out_b = np.empty(len(P), np.int64)
    out_d = np.empty(len(P))
    for a in range(0, len(P), chunk):
      Q = P[a:a + chunk]
      d2 = -2.0 * (Q @ self._centers.T) + self._csq[None, :]
      b = d2.argmin(1)
      out_b[a:a + chunk] = b
      diff = Q - self._centers[b]
      out_d[a:a + chunk] = (np.abs(diff).sum(1) if self.kernel == "laplacian"
                            else np.sqrt((diff.astype(np.float64) ** 2)
                                         .sum(1)))
    return out_b, out_d

  def rebuild(self) -> None:
    """New centres from a sample of the live points; tight radii."""
    live = np.flatnonzero(self._alive[:self._n])
    n = len(live)
    if n == 0:
      self._centers = None
      return
    rng = np.random.default_rng(self._entropy.spawn(1)[0])
    k = self.buckets or max(1, int(round(math.sqrt(n))))
    fit = live if n <= self.fit_sample else rng.choice(
        live, self.fit_sample, replace=False)
    Xf = self._X[fit]
    k = min(k, len(fit))
    if k > 1:  # k-means++ needs k distinct points
      k = min(k, len(np.unique(Xf, axis=0)))
    centers, _ = kmeans_plusplus(int(rng.integers(2 ** 31)), Xf, k)
    centers, _ = lloyd(Xf, centers, iters=4)
    centers = np.asarray(centers, np.float32)
    self._centers = centers
    self._csq = (centers.astype(np.float64) ** 2).sum(1)
    C = len(centers)
    self._radius = np.zeros(C)
    b, dist = self._nearest(self._X[live])
    np.maximum.at(self._radius, b, dist)
    order = np.argsort(b, kind="stable")
    self._count = np.bincount(b, minlength=C).astype(np.int64)
    # one flat array of members, bucket c at [off_c, off_c + cap_c) with
    # room to grow; its members are the first count_c
    cap = self._count + self._count // 4 + 8
    self._off = np.concatenate([[0], np.cumsum(cap)[:-1]]).astype(np.int64)
    self._cap = cap.astype(np.int64)
    self._flat = np.zeros(int(cap.sum()), np.int64)
    start = np.concatenate([[0], np.cumsum(self._count)[:-1]])
    rank = np.arange(n) - np.repeat(start, self._count)
    sorted_ids = live[order]
    self._flat[np.repeat(self._off, self._count) + rank] = sorted_ids
    self._bucket[sorted_ids] = b[order]
    self._slot[sorted_ids] = rank
    self._changes = 0

  def _add_to_buckets(self, ids):
    b, dist = self._nearest(self._X[ids])
    for i, c, r in zip(ids.tolist(), b.tolist(), dist.tolist()):
      if r > self._radius[c]:
        self._radius[c] = r
      cnt = int(self._count[c])
      if cnt == self._cap[c]:  # full: move the bucket to the end, doubled
        cap = 2 * cnt + 8
        moved = np.zeros(cap, np.int64)
        moved[:cnt] = self._flat[self._off[c]:self._off[c] + cnt]
        self._off[c], self._cap[c] = len(self._flat), cap
        self._flat = np.concatenate([self._flat, moved])
      self._flat[self._off[c] + cnt] = i
      self._bucket[i] = c
      self._slot[i] = cnt
      self._count[c] = cnt + 1

  def _remove_from_bucket(self, i):
    c, s = self._bucket[i], self._slot[i]
    last = self._count[c] - 1
    j = self._flat[self._off[c] + last]
    self._flat[self._off[c] + s] = j
    self._slot[j] = s
    self._count[c] = last

  def _members_of(self, buckets):
    """The live members of ``buckets``, concatenated (vectorised)."""
    cnt = self._count[buckets]
    total = int(cnt.sum())
    if total == 0:
      return np.zeros(0, np.int64)
    start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    pos = np.repeat(self._off[buckets] - start, cnt) + np.arange(total)
    return self._flat[pos]

  # -- kernel ----------------------------------------------------------------

  def _f(self, dist):
    """The kernel as a function of the distance (l1 for the Laplacian)."""
    if self.kernel == "gaussian":
      return np.exp(-dist * dist / (2 * self.h * self.h))
    return np.exp(-dist / self.h)

  def _kernel(self, idx, y, ysq):
    X = self._X[idx]
    if self.kernel == "laplacian":
      return np.exp(-np.abs(X - y).sum(1) / self.h)
    d2 = np.maximum(self._sq[idx] - 2.0 * (X @ y) + ysq, 0.0)
    if self.kernel == "gaussian":
      return np.exp(-d2 / (2 * self.h * self.h))
    return np.exp(-np.sqrt(d2) / self.h)

  def _queries_of(self, Y):
    if self._num_live == 0:
      raise ValueError("query on an empty set: insert points first")
    Y = np.asarray(Y, np.float32)
    if Y.ndim == 1:
      Y = Y[None]
    if Y.ndim != 2 or Y.shape[1] != self._dim:
      raise ValueError(f"queries have shape {Y.shape}; expected (m, "
                       f"{self._dim})")
    return Y

  def query_exact(self, Y) -> np.ndarray:
    """The exact ``(1/|X|) sum_x f(x, y)`` per query: one pass over all
    rows in place (no gather), masked to the live ones."""
    Y = self._queries_of(Y)
    rows, alive = slice(0, self._n), self._alive[:self._n]
    return np.array([self._kernel(rows, y, float(y.astype(np.float64) @ y))
                     [alive].sum() / self._num_live for y in Y])

  def _rng(self):
    if self.robust:
      return np.random.default_rng(self._entropy.spawn(1)[0])
    return np.random.default_rng(self._fixed)

  def _estimate(self, y, rng):
    ysq = float(y.astype(np.float64) @ y)
    dc = self._dist_to(y[None], self._centers, self._csq)[0]
    cnt = self._count
    hi = self._f(np.maximum(dc - self._radius, 0.0))
    lo = self._f(dc + self._radius)
    z = self._z
    # stratified: every bucket is a stratum; a pilot sample of each
    # (whole buckets when small), then Neyman's allocation until the
    # normal bound on the error is within eps of the estimate
    live = np.flatnonzero((cnt > 0) & (hi > 0))
    small = live[cnt[live] <= 2 * self.pilot]
    big = live[cnt[live] > 2 * self.pilot]
    ids = self._members_of(small)
    exact = float(self._kernel(ids, y, ysq).sum()) if len(ids) else 0.0
    evals = len(ids)
    # buckets whose whole range is negligible: their midpoint
    n_b = cnt[big].astype(np.float64)
    s1 = np.zeros(len(big))
    s2 = np.zeros(len(big))
    m = np.zeros(len(big), np.int64)
    done = np.zeros(len(big), bool)

    def draw(sel, k):
      which = np.repeat(sel, k)
      offs = (rng.random(len(which)) * cnt[big][which]).astype(np.int64)
      v = self._kernel(self._flat[self._off[big][which] + offs], y, ysq)
      s1[:] += np.bincount(which, weights=v, minlength=len(big))
      s2[:] += np.bincount(which, weights=v * v, minlength=len(big))
      m[sel] += k
      return len(which)

    evals += draw(np.arange(len(big)), self.pilot) if len(big) else 0
    while True:
      mean = np.where(m > 0, s1 / np.maximum(m, 1), 0.0)
      var = np.where(m > 1, np.maximum(s2 / np.maximum(m, 1) - mean * mean,
                                       0.0) * m / np.maximum(m - 1, 1), 0.0)
      # a variance no smaller than a uniform value's over the bucket's
      # known range would allow, scaled down: guards the pilot
      var = np.maximum(var, ((hi[big] - lo[big]) ** 2) * self.range_floor)
      total = exact + float((n_b * mean)[~done].sum()) + float(
          s1[done].sum())
      err = z * math.sqrt(float((n_b * n_b * var / np.maximum(m, 1))[~done]
                                .sum()))
      if err <= self.eps * total or evals >= self.max_evaluations:
        break
      # Neyman: more draws where n_c s_c / sqrt(m_c) is largest
      gain = np.where(done, -1.0, n_b * n_b * var / np.maximum(m, 1))
      sel = np.flatnonzero(gain >= 0.25 * gain.max())
      add = np.maximum(m[sel], self.pilot)
      whole = sel[m[sel] + add >= cnt[big][sel] // 2]
      if len(whole):  # cheaper to sum them exactly
        mem = self._members_of(big[whole])
        v = self._kernel(mem, y, ysq)
        owner = np.repeat(np.arange(len(whole)), cnt[big][whole])
        s1[whole] = np.bincount(owner, weights=v, minlength=len(whole))
        s2[whole] = 0.0
        m[whole] = cnt[big][whole]
        done[whole] = True
        evals += len(mem)
      rest = sel[m[sel] + add < cnt[big][sel] // 2]
      if len(rest):
        evals += draw(rest, int(np.max(add)))
    self.last_evaluations = evals
    return total / self._num_live

  @property
  def max_evaluations(self) -> int:
    return self._max_evals or max(1024, self._num_live // 4)

  def query(self, Y) -> np.ndarray:
    """Estimates of ``(1/|X|) sum_x f(x, y)`` per query (see the module
    doc); ``last_evaluations`` holds the last query's kernel evaluations."""
    Y = self._queries_of(Y)
    if self._centers is None:
      self.rebuild()
    return np.array([self._estimate(y, self._rng()) for y in Y])


class FixedSampleKDE:
  """The non-robust baseline: one uniform sample of ``m`` points drawn once
  (fixed seed), every query answered from it. Its error is small for
  queries chosen in advance and can be found and exploited by queries
  chosen from its answers (:func:`adaptive_attack`)."""

  def __init__(self, points, kernel: str, bandwidth: float, m: int,
               seed: int = 0):
    P = np.asarray(points, np.float32)
    rng = np.random.default_rng(seed)
    self._S = P[rng.choice(len(P), min(m, len(P)), replace=False)]
    self._ks = KernelSum(kernel, bandwidth)
    self._ks.insert(self._S)

  def query(self, Y):
    return self._ks.query_exact(Y)


def adaptive_attack(estimator, points, kernel: str, bandwidth: float, *,
                    queries: int = 1000, step: float | None = None,
                    seed: int = 0):
  """An adaptive adversary: it knows the points (so it computes the exact
  answers) but not the estimator's randomness, and chooses each query from
  the answers so far, climbing towards queries where the estimator errs:
  half its queries perturb the worst query found so far, the others start
  at a random point. Returns the relative errors of its ``queries``."""
  P = np.asarray(points, np.float32)
  ref = KernelSum(kernel, bandwidth)
  ref.insert(P)
  rng = np.random.default_rng(seed)
  step = step if step is not None else 0.5 * bandwidth
  errors, best = [], (-1.0, None)
  for i in range(queries):
    if best[1] is not None and i % 2:
      y = best[1] + step * rng.normal(size=P.shape[1]).astype(np.float32) / \
          math.sqrt(P.shape[1])
    else:
      y = P[rng.integers(len(P))] + 0.1 * bandwidth * rng.normal(
          size=P.shape[1]).astype(np.float32) / math.sqrt(P.shape[1])
    exact = float(ref.query_exact(y)[0])
    err = abs(float(estimator.query(y)[0]) / exact - 1.0) if exact > 0 \
        else 0.0
    errors.append(err)
    if err > best[0]:
      best = (err, y)
  return np.asarray(errors)
