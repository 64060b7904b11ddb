# Research sketch for issue #20 (not product code; not imported anywhere).
# A dynamic kernel-sum estimator over prefix-nested p-stable LSH strata,
# written 2026-11-29. What it measured (200,000 points of a 100-component
# Gaussian mixture in d=32, Gaussian kernel, h=4, mean density 1.5e-3,
# 60 queries from the mixture, eps=0.1, delta=0.1):
#   * the strata partition the set exactly (their exact sums add up to the
#     exact total), and the estimate is unbiased given the strata;
#   * but only 60-88% of queries land within 0.1 (pilot 256-512 samples
#     per stratum, 4-8 codes per table), against the 90% issue #20 asks:
#     a near point whose FIRST code differs from the query's falls into
#     the outermost ring, so outer rings hold ~1% heavy points among
#     ~90,000 light ones (coefficient of variation ~14), and the pilot's
#     variance estimate misses them;
#   * the evaluations needed (4,000-36,000 per query) made it 1-3x slower
#     than the exact sum at this n (the exact sum is one BLAS
#     matrix-vector product, 0.9 ms for 200,000 x 32).
#   * unions of finest buckets over several tables capture 90% of the mass
#     only with near sets of 5-13% of the points (p-stable LSH separates
#     the within-cluster distance, 8, from the between-cluster one, 24,
#     poorly in d=32).
# Next: average strata estimates over several tables and take the error
# from the spread between tables (it sees the heavy tails the pilot
# misses), or data-dependent partitions (k-means buckets with radius
# bounds), then the approximate-attention option.
"""A dynamic kernel-sum structure: ``(1/|X|) sum_x f(x, y)`` for queries
``y`` in time sublinear in ``|X|``, under insertions, deletions and
replacements, with fresh randomness per query for robustness to queries
chosen from earlier answers.

A hashing-based estimator over multi-resolution LSH buckets (in the line of
Charikar and Siminelakis's hashing-based estimators, which the dynamic
robust KDE papers this project starts from extend), written here:

* **Multi-resolution buckets.** Each table of a pool concatenates
  ``hashes`` p-stable projections (Datar et al.: Gaussian projections for
  the Euclidean kernels, Cauchy for the Laplacian's l1 distance),
  ``floor((a.x + b) / w)``, with the bucket width ``w`` set from the
  bandwidth. Points are sorted by their codes packed most significant
  first, so the points sharing the query's first ``j`` codes are one
  contiguous range for every ``j``, and the ranges nest: sharing all
  codes (nearest), all but the last, ..., none (everything). The rings
  between consecutive ranges are the strata: points in one stratum lie at
  similar distances from the query, so their kernel values vary little.
* **Importance by stratum.** The estimate is ``sum_j |S_j| * mean of a
  uniform sample of S_j`` (unbiased given the strata, whatever the hash
  drew; a stratum no larger than its sample is summed exactly). Samples
  go where they cut the variance most (Neyman's allocation from a pilot
  sample per stratum), doubling until a normal (CLT) bound on the
  relative error, from the samples' own variances, is within ``eps`` at
  confidence ``1 - delta``, or the budget ``max_samples`` is spent.
* **Robustness.** Each query draws its table and its samples from a fresh
  generator (seeded from the operating system's entropy unless ``seed``
  is given), so an answer carries no information about the randomness a
  later query will use: the per-query guarantee holds for adaptively
  chosen queries. ``robust=False`` reuses one fixed generator state per
  query (the same table and samples each time): the estimator an adaptive
  adversary can learn (``benchmarks/sketch.py`` attacks both).

Dynamic: ids are stable row numbers (a deleted id's row is reused by a
later insert). Deleted rows stay in the sorted tables and count as zero;
inserted or replaced rows are summed exactly (a pending stratum, their old
entries counting as zero) until the tables are re-sorted, when the pending
rows outgrow ``rebuild_fraction`` of the set.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

KERNELS = ("gaussian", "exponential", "laplacian")
_BITS = 7  # bits per code in a packed key (codes clipped to [0, 128))


class KernelSum:
  """See the module doc.

  Args:
    kernel: ``gaussian`` exp(-|x-y|^2 / (2 h^2)), ``exponential``
      exp(-|x-y|_2 / h), ``laplacian`` exp(-|x-y|_1 / h).
    bandwidth: ``h`` > 0.
    eps, delta: relative error ``eps`` with probability ``1 - delta`` per
      query (both in (0, 1)).
    tables: hash tables in the pool; ``probe``: tables each query uses.
    hashes: projections per table (concatenated); ``width``: bucket width
      (default: twice the distance at which the kernel falls to 0.05).
    min_samples / max_samples: the far sample's first batch and cap.
  """

  def __init__(self, kernel: str = "gaussian", bandwidth: float = 1.0,
               eps: float = 0.1, delta: float = 0.1, *, tables: int = 8,
               hashes: int = 8, width: float | None = None,
               pilot: int = 32, max_samples: int = 1 << 16,
               rebuild_fraction: float = 0.01, robust: bool = True,
               seed: int | None = None):
    if kernel not in KERNELS:
      raise ValueError(f"kernel (={kernel!r}) must be one of {KERNELS}")
    if not bandwidth > 0:
      raise ValueError(f"bandwidth (={bandwidth}) must be > 0")
    for name, v in (("eps", eps), ("delta", delta)):
      if not 0 < v < 1:
        raise ValueError(f"{name} (={v}) must lie in (0, 1)")
    if not 1 <= hashes <= 63 // _BITS:
      raise ValueError(f"hashes (={hashes}) must lie in [1, {63 // _BITS}]")
    self.kernel, self.h = kernel, float(bandwidth)
    self.eps, self.delta = float(eps), float(delta)
    self.z = NormalDist().inv_cdf(1 - delta / 2)
    self.num_tables, self.hashes = tables, hashes
    far = {"gaussian": math.sqrt(2 * math.log(20)),
           "exponential": math.log(20), "laplacian": math.log(20)}[kernel]
    self.width = float(width or 2 * far * self.h)
    self.pilot, self.max_samples = pilot, max_samples
    self.rebuild_fraction = rebuild_fraction
    self.robust = robust
    self._entropy = np.random.SeedSequence(seed)
    self._fixed_seed = self._entropy.generate_state(1)[0]
    self._queries = 0
    self._X = None  # rows; allocated on the first insert
    self._n = 0  # rows in use (alive or free)
    self._alive = np.zeros(0, bool)
    self._sq = np.zeros(0)  # squared norms
    self._live = np.zeros(0, np.int64)  # alive ids, swap-deleted
    self._slot = np.zeros(0, np.int64)  # id -> position in _live
    self._num_live = 0
    self._free: list = []
    self._pending: list = []  # ids inserted since the last rebuild
    self._keys = None  # [tables, rows] packed codes
    self._order = None  # per table: rows sorted by packed codes
    self._sorted = None  # per table: the packed codes, sorted
    self._indexed = np.zeros(0, bool)  # row counted by the sorted tables
    self.last_evaluations = 0  # kernel evaluations of the last query

  # -- storage ---------------------------------------------------------------

  def __len__(self) -> int:
    return self._num_live

  @property
  def dim(self):
    return None if self._X is None else self._X.shape[1]

  def _init(self, d):
    rng = np.random.default_rng(self._entropy.spawn(1)[0])
    shape = (self.num_tables, self.hashes, d)
    self._proj = (rng.standard_cauchy(shape) if self.kernel == "laplacian"
                  else rng.standard_normal(shape)).astype(np.float32)
    self._shift = rng.uniform(0, self.width, (self.num_tables, self.hashes))
    self._base = None  # per (table, hash): the code packed as 0
    self._X = np.zeros((0, d), np.float32)
    self._keys = np.zeros((self.num_tables, 0), np.int64)

  def _grow(self, rows):
    cap = self._X.shape[0]
    if rows <= cap:
      return
    new = max(rows, 2 * cap, 1024)
    X = np.zeros((new, self._X.shape[1]), np.float32)
    X[:cap] = self._X
    self._X = X
    keys = np.zeros((self.num_tables, new), np.int64)
    keys[:, :cap] = self._keys
    self._keys = keys
    for name, dtype in (("_alive", bool), ("_live", np.int64),
                        ("_slot", np.int64), ("_sq", np.float64),
                        ("_indexed", bool)):
      arr = np.zeros(new, dtype)
      arr[:cap] = getattr(self, name)
      setattr(self, name, arr)

  def _codes(self, P):
    """``[tables, hashes, m]`` integer codes of the points ``P [m, d]``."""
    t, k, d = self._proj.shape
    proj = (self._proj.reshape(t * k, d) @ P.T).reshape(t, k, -1)
    return np.floor((proj + self._shift[:, :, None]) /
                    self.width).astype(np.int64)

  def _hash(self, P, chunk=65536):
    """``[tables, m]`` packed keys: codes (offset, clipped to _BITS bits)
    most significant first, so sharing a key prefix is sharing codes."""
    out = np.empty((self.num_tables, P.shape[0]), np.int64)
    for a in range(0, P.shape[0], chunk):
      codes = self._codes(P[a:a + chunk])
      if self._base is None:  # centre the first points' codes
        self._base = np.median(codes, axis=2).astype(np.int64) - \
            (1 << (_BITS - 1))
      codes = np.clip(codes - self._base[:, :, None], 0, (1 << _BITS) - 1)
      key = np.zeros(codes.shape[::2], np.int64)
      for j in range(self.hashes):
        key = (key << _BITS) | codes[:, j]
      out[:, a:a + chunk] = key
    return out

  def _check_points(self, points):
    P = np.asarray(points, np.float32)
    if P.ndim == 1:
      P = P[None]
    if P.ndim != 2:
      raise ValueError(f"points must be [m, d]; got shape {P.shape}")
    if self._X is not None and P.shape[1] != self._X.shape[1]:
      raise ValueError(f"points have dimension {P.shape[1]}; the set has "
                       f"{self._X.shape[1]}")
    return P

  def insert(self, points) -> np.ndarray:
    """Adds points; returns their ids."""
    P = self._check_points(points)
    if self._X is None:
      self._init(P.shape[1])
    m = P.shape[0]
    reuse = [self._free.pop() for _ in range(min(m, len(self._free)))]
    fresh = np.arange(self._n, self._n + m - len(reuse))
    ids = np.concatenate([np.asarray(reuse, np.int64), fresh]).astype(
        np.int64)
    self._n += len(fresh)
    self._grow(self._n)
    self._X[ids] = P
    self._sq[ids] = (P.astype(np.float64) ** 2).sum(1)
    self._keys[:, ids] = self._hash(P)
    self._alive[ids] = True
    self._indexed[ids] = False
    pos = np.arange(self._num_live, self._num_live + m)
    self._live[pos] = ids
    self._slot[ids] = pos
    self._num_live += m
    self._pending.extend(ids.tolist())
    if len(self._pending) > max(64, self.rebuild_fraction * self._num_live):
      self.rebuild()
    return ids

  def _check_ids(self, ids):
    ids = np.atleast_1d(np.asarray(ids, np.int64))
    bad = ids[(ids < 0) | (ids >= self._n)]
    if len(bad) == 0:
      bad = ids[~self._alive[ids]]
    if len(bad):
      raise KeyError(f"unknown id(s) {bad[:5].tolist()} (deleted, or "
                     f"never inserted)")
    if len(np.unique(ids)) != len(ids):
      raise KeyError("an id is given twice")
    return ids

  def delete(self, ids) -> None:
    """Removes points by id (an unknown id is an error)."""
    for i in self._check_ids(ids).tolist():
      self._alive[i] = False
      last = self._live[self._num_live - 1]
      pos = self._slot[i]
      self._live[pos] = last
      self._slot[last] = pos
      self._num_live -= 1
      self._free.append(i)

  def replace(self, ids, points) -> None:
    """Moves the points ``ids`` to ``points`` (ids kept)."""
    ids = self._check_ids(ids)
    P = self._check_points(points)
    if P.shape[0] != len(ids):
      raise ValueError(f"{len(ids)} ids but {P.shape[0]} points")
    self._X[ids] = P
    self._sq[ids] = (P.astype(np.float64) ** 2).sum(1)
    self._keys[:, ids] = self._hash(P)
    self._indexed[ids] = False
    self._pending.extend(ids.tolist())
    if len(self._pending) > max(64, self.rebuild_fraction * self._num_live):
      self.rebuild()

  def rebuild(self) -> None:
    """Re-sorts every table over the rows in use (pending points join)."""
    if self._X is None:
      return
    self._order = np.argsort(self._keys[:, :self._n], axis=1, kind="stable")
    self._sorted = np.take_along_axis(self._keys[:, :self._n], self._order,
                                      axis=1)
    self._indexed[:self._n] = True
    self._pending = []

  # -- kernel ----------------------------------------------------------------

  def _kernel(self, idx, y):
    """Kernel values of rows ``idx`` (an index array, or a slice)."""
    X = self._X[idx]
    if self.kernel == "laplacian":
      return np.exp(-np.abs(X - y).sum(1) / self.h)
    # |x|^2 - 2 x.y + |y|^2: one matrix-vector product, no [m, d] temporary
    d2 = np.maximum(self._sq[idx] - 2.0 * (X @ y) + float(y @ y), 0.0)
    if self.kernel == "gaussian":
      return np.exp(-d2 / (2 * self.h * self.h))
    return np.exp(-np.sqrt(d2) / self.h)

  def _queries_of(self, Y):
    if self._num_live == 0:
      raise ValueError("query on an empty set: insert points first")
    Y = np.asarray(Y, np.float32)
    if Y.ndim == 1:
      Y = Y[None]
    if Y.ndim != 2 or Y.shape[1] != self._X.shape[1]:
      raise ValueError(f"queries have shape {Y.shape}; expected (m, "
                       f"{self._X.shape[1]})")
    return Y

  def query_exact(self, Y) -> np.ndarray:
    """The exact ``(1/|X|) sum_x f(x, y)`` per query."""
    Y = self._queries_of(Y)
    alive = self._alive[:self._n]
    rows = slice(0, self._n)  # all rows in place (no gather), masked
    return np.array([self._kernel(rows, y)[alive].sum() / self._num_live
                     for y in Y])

  def _rng(self):
    self._queries += 1
    if self.robust:
      return np.random.default_rng(self._entropy.spawn(1)[0])
    return np.random.default_rng(self._fixed_seed)

  def _strata(self, y, table):
    """Position ranges ``(lo, hi)`` in ``table``'s sorted order of the
    points sharing the query's first ``j`` codes, ``j = hashes .. 0``."""
    key = int(self._hash(y[None])[table, 0])
    sorted_keys = self._sorted[table]
    out = []
    for j in range(self.hashes, -1, -1):
      shift = _BITS * (self.hashes - j)
      lo_key = (key >> shift) << shift
      lo, hi = np.searchsorted(sorted_keys, [lo_key, lo_key + (1 << shift)])
      out.append((int(lo), int(hi)))
    return out

  def _values(self, rows, y):
    """Kernel values of ``rows`` of the sorted tables; rows deleted, or
    pending (summed exactly elsewhere), count as zero."""
    v = self._kernel(rows, y)
    return np.where(self._alive[rows] & self._indexed[rows], v, 0.0)

  def _estimate(self, y, rng):
    n = self._num_live
    pend = np.asarray(self._pending, np.int64)
    pend = pend[self._alive[pend]] if len(pend) else pend
    exact = float(self._kernel(pend, y).sum()) if len(pend) else 0.0
    evals = len(pend)
    if self._order is None:
      self.last_evaluations = evals
      return exact / n
    t = int(rng.integers(self.num_tables))
    order = self._order[t]
    ranges = self._strata(y, t)
    # stratum j: the ring between range j (more codes shared) and j + 1
    strata = []  # (size, pieces [(a, b)])
    prev = None
    for lo, hi in ranges:
      pieces = [(lo, hi)] if prev is None else [(lo, prev[0]),
                                                (prev[1], hi)]
      pieces = [(a, b) for a, b in pieces if b > a]
      size = sum(b - a for a, b in pieces)
      if size:
        strata.append((size, pieces))
      prev = (lo, hi)
    stats = []  # per stratum: [size, pieces, sum, sum of squares, m, exact]
    for size, pieces in strata:
      if size <= 2 * self.pilot:
        rows = order[np.concatenate([np.arange(a, b) for a, b in pieces])]
        v = self._values(rows, y)
        evals += size
        stats.append([size, pieces, v.sum(), 0.0, size, True])
      else:
        stats.append([size, pieces, 0.0, 0.0, 0, False])
        self._sample(stats[-1], order, y, rng, self.pilot)
        evals += self.pilot
    while True:
      total, var = exact, 0.0
      for size, _, s1, s2, m, done in stats:
        if done:
          total += s1
          continue
        mean = s1 / m
        total += size * mean
        var += size * size * max(s2 / m - mean * mean, 0.0) / (m - 1)
      if (self.z * math.sqrt(var) <= self.eps * total or
          evals >= self.max_samples or var == 0.0):
        break
      # double the sample where it cuts the variance most
      best = max((st for st in stats if not st[5]), key=lambda st: (
          st[0] ** 2 * max(st[3] / st[4] - (st[2] / st[4]) ** 2, 0.0) /
          st[4]))
      if best[4] * 2 >= best[0]:  # cheaper to sum it exactly
        rows = order[np.concatenate([np.arange(a, b) for a, b in best[1]])]
        v = self._values(rows, y)
        evals += best[0]
        best[2:] = [v.sum(), 0.0, best[0], True]
      else:
        evals += best[4]
        self._sample(best, order, y, rng, best[4])
    self.last_evaluations = evals
    return total / n

  def _sample(self, st, order, y, rng, m):
    """``m`` more uniform samples of stratum ``st`` (in place)."""
    size, pieces = st[0], st[1]
    pos = rng.integers(0, size, m)
    a0, b0 = pieces[0]
    first = b0 - a0
    pos = np.where(pos < first, a0 + pos,
                   (pieces[-1][0] + pos - first) if len(pieces) > 1 else
                   a0 + pos)
    v = self._values(order[pos], y)
    st[2] += v.sum()
    st[3] += (v * v).sum()
    st[4] += m

  def query(self, Y) -> np.ndarray:
    """Estimates of ``(1/|X|) sum_x f(x, y)`` per query (see the module
    doc); ``last_evaluations`` holds the last query's kernel evaluations."""
    Y = self._queries_of(Y)
    return np.array([self._estimate(y, self._rng()) for y in Y])
