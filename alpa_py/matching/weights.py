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
  accuracy knob (all clusters: exact). Ranking clusters by the centroid's
  inner product with the query plus the cluster's radius times ``|x|``
  bounds every member's weight from above (Cauchy-Schwarz), so a cluster
  is skipped only when its bound is below the others'.

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

  Args:
    embeddings: ``[n, d]`` item embeddings.
    probe: clusters whose items are scored per query (the accuracy knob).
    num_clusters: default ``round(sqrt(n))``.
    iters: Lloyd iterations of the clustering.
    seed: the clustering's seed.
  """

  def __init__(self, embeddings, *, probe: int = 4,
               num_clusters: int | None = None, iters: int = 8,
               seed: int = 0):
    e = _check_items(embeddings)
    n = e.shape[0]
    k = int(num_clusters or max(1, round(np.sqrt(n))))
    if not 1 <= k <= n:
      raise ValueError(f"num_clusters (={k}) must lie in [1, n={n}]")
    if probe < 1:
      raise ValueError(f"probe (={probe}) must be >= 1")
    self.probe = int(probe)
    rng = np.random.default_rng(seed)
    centers, assign = _kmeans(e, k, iters, rng)
    order = np.argsort(assign, kind="stable")
    self.ids = order  # position -> item id
    self.position = np.empty(n, np.int64)
    self.position[order] = np.arange(n)
    counts = np.bincount(assign, minlength=k)
    self.starts = np.concatenate([[0], np.cumsum(counts)])
    cluster_of = assign[order]
    d = e.shape[1]
    # One product per level scores, bounds and masks at once: items are
    # stored as [embedding | penalty] and centroids as [centroid | penalty |
    # radius], against the query [x, 1, |x|]; a penalty is 0 while open and
    # -inf once closed.
    self._items = np.zeros((n, d + 1), np.float32)
    self._items[:, :d] = e[order]
    self._centers = np.zeros((k, d + 2), np.float32)
    self._centers[:, :d] = centers
    self._centers[:, d] = np.where(counts > 0, 0.0, -np.inf)
    np.maximum.at(self._centers[:, d + 1], cluster_of,
                  np.linalg.norm(e[order] - centers[cluster_of], axis=1))
    self._query = np.empty(d + 2, np.float32)
    self._query[d] = 1.0
    self._qx = self._query[:d]  # x
    self._qi = self._query[:d + 1]  # [x, 1]: the items' query
    self._starts = self.starts.tolist()
    self._bound = np.empty(k, np.float32)  # the centroid product's output
    self.open_pos = np.ones(n, bool)  # by position
    self.open_count = counts.astype(np.int64)
    self.cluster_of_pos = cluster_of
    self.embeddings = e

  @property
  def sorted(self) -> np.ndarray:
    """Item embeddings in cluster order (position p is item ``ids[p]``)."""
    return self._items[:, :-1]

  @property
  def centers(self) -> np.ndarray:
    return self._centers[:, :-2]

  @property
  def radius(self) -> np.ndarray:
    """Per cluster, the largest distance of a member from its centroid."""
    return self._centers[:, -1]

  def close(self, item: int) -> None:
    p = self.position[item]
    if self.open_pos[p]:
      self.open_pos[p] = False
      self._items[p, -1] = -np.inf
      c = self.cluster_of_pos[p]
      self.open_count[c] -= 1
      if self.open_count[c] == 0:
        self._centers[c, -2] = -np.inf

  def reopen(self, item: int) -> None:
    """An item that had filled gets room again (a slot was released)."""
    p = self.position[item]
    if not self.open_pos[p]:
      self.open_pos[p] = True
      self._items[p, -1] = 0.0
      c = self.cluster_of_pos[p]
      self.open_count[c] += 1
      self._centers[c, -2] = 0.0

  def top(self, x, k: int):
    """``(ids, weights)`` of up to ``k`` open items of the largest weights
    among the ``probe`` clusters of the highest bound; weights exact."""
    q, qx = self._query, self._qx
    qx[:] = x
    q[-1] = math.sqrt(qx.dot(qx))
    bound = np.dot(self._centers, q, out=self._bound)
    if self.probe == 1:  # the common case, with the fewest calls
      c = int(bound.argmax())
      if bound[c] == -np.inf:
        return self.ids[:0], np.zeros(0, np.float32)
      a, b = self._starts[c], self._starts[c + 1]
      w = self._items[a:b] @ self._qi
      if k == 1:
        i = int(w.argmax())
        return self.ids[a + i:a + i + 1], w[i:i + 1]
      return _top(self.ids[a:b], w, k)
    live = int((self.open_count > 0).sum())
    p = min(self.probe, live)
    if p == 0:
      return self.ids[:0], np.zeros(0, np.float32)
    best = np.argpartition(-bound, p - 1)[:p]
    # the chosen clusters are contiguous runs: one small product each
    starts, qi = self._starts, self._qi
    runs = [(starts[c], starts[c + 1]) for c in best.tolist()]
    pos = np.concatenate([np.arange(a, b) for a, b in runs])
    w = np.concatenate([self._items[a:b] @ qi for a, b in runs])
    got, wt = _top(pos, w, k)
    return self.ids[got], wt
