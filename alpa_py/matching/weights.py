"""Edge weights of online matching as inner products: an exact scan and a
sublinear maximum-inner-product structure.

Both answer the question an online matching algorithm asks per arrival:
the ``k`` items still open with the largest weights ``<x, e_j>`` (and those
weights, exact). Items close (``close``) when their capacity is used up.

* :class:`ExactWeights`: one matrix-vector product over all n items, O(nd).
* :class:`ClusteredMIPS`: an inverted-file index. Items are clustered by
  k-means (Lloyd's iterations from a k-means++ seeding) into about
  ``sqrt(n)`` clusters stored contiguously; a query scores the centroids,
  O(sqrt(n) d), and computes exact weights only for the items of the
  ``probe`` best clusters, O(probe n / sqrt(n) d). ``probe`` is the
  accuracy knob (all clusters: exact). Clusters are ranked by the
  centroid's inner product with the query (``radius_bound=True`` adds the
  cluster's radius times ``|x|``, an upper bound on every member's weight
  by Cauchy-Schwarz, at the price of one more product per query).

This is the clustering route to sublinear maximum inner product search;
the online-matching paper this module follows (weights of the form
<user, item> computed approximately in sublinear time while greedy keeps
its competitive ratio) uses randomized (LSH-style) structures. Here the
guarantee is empirical: ``benchmarks/matching.py`` measures the matching
value against greedy with exact weights.
"""

from __future__ import annotations

import math

import numpy as np


_F32 = np.dtype(np.float32)


def _check_items(embeddings) -> np.ndarray:
  e = np.asarray(embeddings, np.float32)
  if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
    raise ValueError(f"item embeddings must be a non-empty [n, d] array; got "
                     f"shape {tuple(e.shape)}")
  return e


class _Items:
  """Shape of a weight structure over ``self.embeddings [n, d]``."""

  embeddings: np.ndarray

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  @property
  def num_items(self) -> int:
    return self.embeddings.shape[0]


class ExactWeights(_Items):
  """Exact weights by one matrix-vector product per query: O(nd)."""

  def __init__(self, embeddings):
    self.embeddings = _check_items(embeddings)
    self.open = np.ones(self.embeddings.shape[0], bool)

  def close(self, item: int) -> None:
    self.open[item] = False

  def reopen(self, item: int) -> None:
    """An item that had filled gets room again (a slot was released)."""
    self.open[item] = True

  def weights(self, x) -> np.ndarray:
    """All n weights (closed items included)."""
    return self.embeddings @ x

  def top(self, x, k: int):
    """``(ids, weights)`` of the ``k`` open items of largest weight, best
    first (fewer when fewer are open)."""
    w = np.where(self.open, self.embeddings @ x, -np.inf)
    return _top(np.arange(w.shape[0]), w, k)

  def best(self, x):
    """``(id, weight)`` of the open item of largest weight; ``(-1, -inf)``
    when every item is closed."""
    w = np.where(self.open, self.embeddings @ x, -np.inf)
    j = int(w.argmax())
    return (j, w[j]) if w[j] > -np.inf else (-1, -np.inf)


def _top(ids, w, k):
  k = min(k, int(np.isfinite(w).sum()))
  if k <= 0:
    return ids[:0], w[:0]
  part = np.argpartition(-w, k - 1)[:k]
  order = part[np.argsort(-w[part], kind="stable")]
  return ids[order], w[order]


def _kmeans(x, k, iters, rng):
  """Centroids and assignment: k-means++ seeding, then Lloyd's iterations."""
  n = x.shape[0]
  centers = np.empty((k, x.shape[1]), np.float32)
  centers[0] = x[rng.integers(n)]
  d2 = ((x - centers[0]) ** 2).sum(1)
  for c in range(1, k):
    p = d2 / d2.sum() if d2.sum() > 0 else None
    centers[c] = x[rng.choice(n, p=p)]
    d2 = np.minimum(d2, ((x - centers[c]) ** 2).sum(1))
  sq = (x ** 2).sum(1)
  for _ in range(iters):
    dist = sq[:, None] - 2 * x @ centers.T + (centers ** 2).sum(1)[None, :]
    assign = dist.argmin(1)
    for c in range(k):
      members = x[assign == c]
      if len(members):
        centers[c] = members.mean(0)
  dist = sq[:, None] - 2 * x @ centers.T + (centers ** 2).sum(1)[None, :]
  return centers, dist.argmin(1)


class ClusteredMIPS(_Items):
  """Inverted-file maximum inner product search (see the module doc).

  Layout, chosen so that a query is two matrix-vector products and two
  argmaxes with little else: cluster ``c`` owns the positions
  ``[start_c, start_c + size_c)`` of one contiguous item array, and its
  *open* items are the first ``count_c`` of them (closing an item swaps it
  behind the open ones; reopening swaps it back), so each cluster's open
  items are one precomputed view. Centroids of clusters with open items
  are likewise the first ``live`` rows of the centroid array. No mask,
  no copy of the query.

  Args:
    embeddings: ``[n, d]`` item embeddings.
    probe: clusters whose items are scored per query (the accuracy knob).
    num_clusters: default ``round(sqrt(n))``.
    iters: Lloyd iterations of the clustering.
    seed: the clustering's seed.
    radius_bound: rank clusters by ``<c, x> + r |x|`` (an upper bound on
      every member's weight, by Cauchy-Schwarz, with ``r`` the cluster's
      radius) instead of by ``<c, x>`` alone; one more product per query.
  """

  def __init__(self, embeddings, *, probe: int = 4,
               num_clusters: int | None = None, iters: int = 8,
               seed: int = 0, radius_bound: bool = False):
    e = _check_items(embeddings)
    n = e.shape[0]
    k = int(num_clusters or max(1, round(np.sqrt(n))))
    if not 1 <= k <= n:
      raise ValueError(f"num_clusters (={k}) must lie in [1, n={n}]")
    if probe < 1:
      raise ValueError(f"probe (={probe}) must be >= 1")
    self.probe = int(probe)
    self.radius_bound = bool(radius_bound)
    rng = np.random.default_rng(seed)
    centers, assign = _kmeans(e, k, iters, rng)
    # empty clusters are dropped
    counts = np.bincount(assign, minlength=k)
    keep = np.flatnonzero(counts)
    relabel = np.full(k, -1, np.int64)
    relabel[keep] = np.arange(len(keep))
    assign, centers, counts = relabel[assign], centers[keep], counts[keep]
    k = len(keep)
    self.num_clusters = k
    order = np.argsort(assign, kind="stable")
    self.ids = order.astype(np.int64)  # position -> item id
    self.position = np.empty(n, np.int64)  # item id -> position
    self.position[order] = np.arange(n)
    self.cluster_of = assign.astype(np.int64)  # item id -> cluster
    self._start = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
    self._count = counts.tolist()  # open items per cluster
    self._items = np.ascontiguousarray(e[order])
    radius = np.zeros(k, np.float32)
    np.maximum.at(radius, assign,
                  np.linalg.norm(e - centers[assign], axis=1))
    self._centers = np.ascontiguousarray(centers, np.float32)  # by row
    self._radius = radius  # by row
    self._row_cluster = list(range(k))  # centroid row -> cluster
    self._cluster_row = list(range(k))  # cluster -> centroid row
    self._live = k
    self._score = np.empty(k, np.float32)
    # by centroid row: the cluster's open items and their ids (views)
    self._row_runs = [None] * k
    for c in range(k):
      self._refresh(c)
    self._refresh_live()
    self.embeddings = e

  def _refresh(self, c: int) -> None:
    a = self._start[c]
    b = a + self._count[c]
    self._row_runs[self._cluster_row[c]] = (self._items[a:b], self.ids[a:b])

  def _refresh_live(self) -> None:
    live = self._live
    self._cview = self._centers[:live]
    self._rview = self._radius[:live]
    self._sview = self._score[:live]
    # the path of one probe, no radius, k = 1 with open items left
    self._fast = live > 0 and self.probe == 1 and not self.radius_bound

  @property
  def centers(self) -> np.ndarray:
    """Centroids, by cluster."""
    return self._centers[self._cluster_row]

  @property
  def radius(self) -> np.ndarray:
    """Per cluster, the largest distance of a member from its centroid."""
    return self._radius[self._cluster_row]

  def _swap_items(self, p: int, q: int) -> None:
    if p != q:
      items, ids = self._items, self.ids
      items[[p, q]] = items[[q, p]]
      ids[p], ids[q] = ids[q], ids[p]
      self.position[ids[p]] = p
      self.position[ids[q]] = q

  def _swap_rows(self, r: int, s: int) -> None:
    if r != s:
      self._centers[[r, s]] = self._centers[[s, r]]
      self._radius[[r, s]] = self._radius[[s, r]]
      for lst in (self._row_cluster, self._row_runs):
        lst[r], lst[s] = lst[s], lst[r]
      rc = self._row_cluster
      self._cluster_row[rc[r]] = r
      self._cluster_row[rc[s]] = s

  def is_open(self, item: int) -> bool:
    c = int(self.cluster_of[item])
    return int(self.position[item]) < self._start[c] + self._count[c]

  def close(self, item: int) -> None:
    if not self.is_open(item):
      return
    c = int(self.cluster_of[item])
    last = self._start[c] + self._count[c] - 1
    self._swap_items(int(self.position[item]), last)
    self._count[c] -= 1
    self._refresh(c)
    if self._count[c] == 0:  # the centroid leaves the live rows
      self._swap_rows(self._cluster_row[c], self._live - 1)
      self._live -= 1
      self._refresh_live()

  def reopen(self, item: int) -> None:
    """An item that had filled gets room again (a slot was released)."""
    if self.is_open(item):
      return
    c = int(self.cluster_of[item])
    self._swap_items(int(self.position[item]),
                     self._start[c] + self._count[c])
    self._count[c] += 1
    self._refresh(c)
    if self._count[c] == 1:
      self._swap_rows(self._cluster_row[c], self._live)
      self._live += 1
      self._refresh_live()

  def best(self, x):
    """``(id, weight)`` of the open item of largest weight in the cluster
    of the highest score (of ``probe`` clusters); ``(-1, -inf)`` when
    every item is closed. The short path of one-candidate greedy: numpy
    scalars out, no arrays built."""
    if self._fast and type(x) is np.ndarray and x.dtype is _F32:
      # ``.dot`` (the method) has fewer dispatch layers than ``np.dot``
      items, ids = self._row_runs[self._cview.dot(x, self._sview).argmax()]
      w = items.dot(x)
      i = w.argmax()
      return ids[i], w[i]
    ids, w = self.top(x, 1)
    return (ids[0], w[0]) if len(ids) else (-1, -np.inf)

  def top(self, x, k: int):
    """``(ids, weights)`` of up to ``k`` open items of the largest weights
    among the ``probe`` clusters of the highest score; weights exact."""
    if self._fast and k == 1 and type(x) is np.ndarray and x.dtype is _F32:
      # the common case in the fewest steps; ``.dot`` (the method) has
      # fewer dispatch layers than ``np.dot``
      items, ids = self._row_runs[self._cview.dot(x, self._sview).argmax()]
      w = items.dot(x)
      i = w.argmax()
      return ids[i:i + 1].copy(), w[i:i + 1]
    x = np.asarray(x, np.float32)
    if self._live == 0:
      return self.ids[:0], np.zeros(0, np.float32)
    score = self._cview.dot(x, self._sview)
    if self.radius_bound:
      score += self._rview * math.sqrt(x.dot(x))
    if self.probe == 1:
      items, ids = self._row_runs[score.argmax()]
      w = items.dot(x)
      if k == 1:
        i = w.argmax()
        return ids[i:i + 1].copy(), w[i:i + 1]
      return _top(ids, w, k)
    p = min(self.probe, self._live)
    rows = np.argpartition(-score, p - 1)[:p] if p < self._live else \
        range(self._live)
    runs = [self._row_runs[r] for r in rows]
    ids = np.concatenate([run_ids for _, run_ids in runs])
    w = np.concatenate([items.dot(x) for items, _ in runs])
    return _top(ids, w, k)
