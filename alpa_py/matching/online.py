"""Online bipartite b-matching with inner-product weights.

Items ``j`` (embeddings ``e_j``, capacities ``c_j``) wait; arrivals ``x_i``
come one at a time and each is matched at once, for good, to one item with
capacity left (or to none), gaining ``w_ij = <x_i, e_j>``. Algorithms:

* :func:`greedy`: the open item of largest positive weight. With exact
  weights it is 1/2-competitive, and it stays so with weights that are
  approximately the largest (the property the sublinear-weights paper
  proves for its data structures).
* :func:`primal_dual`: the discounted choice of Feldman, Korula, Mirrokni,
  Muthukrishnan and Pal (WINE 2009) for weighted b-matching: each item
  keeps a price ``beta_j``; an arrival goes to the item maximising
  ``w_ij - beta_j`` when that is positive, and the item's price rises as
  ``beta_j <- beta_j (1 + 1/c_j) + w_ij / ((e_c - 1) c_j)`` with
  ``e_c = (1 + 1/c_j)^c_j`` (an exponential average of the weights it has
  taken, approaching ``1 - 1/e`` competitiveness for large capacities in
  their free-disposal model). Here a full item stays full (no disposal),
  as tokens cannot be recalled from an expert.
* :func:`offline_optimum`: the best matching knowing every arrival, a
  min-cost flow (OR-Tools ``SimpleMinCostFlow``), for evaluation.

Weights come from a structure with ``top(x, k)`` and ``close(item)``
(:mod:`alpa_py.matching.weights`): the algorithms look at the ``candidates``
best open items of each arrival.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from alpa_py.matching.weights import ClusteredMIPS, ExactWeights


@dataclasses.dataclass(frozen=True)
class MatchResult:
  """``assignment[i]``: item of arrival ``i`` (-1: unmatched); ``value``:
  total weight; ``unmatched``: arrivals left unmatched; ``load[j]``:
  arrivals matched to item ``j``."""

  assignment: np.ndarray
  value: float
  unmatched: int
  load: np.ndarray


def check_capacities(capacities, num_items: int) -> np.ndarray:
  cap = np.asarray(capacities)
  if cap.ndim == 0:
    cap = np.full(num_items, cap)
  if cap.shape != (num_items,):
    raise ValueError(f"capacities has shape {tuple(cap.shape)}; expected "
                     f"({num_items},), one per item (or a scalar)")
  if not np.all(cap == np.round(cap)) or np.any(cap <= 0):
    bad = cap[(cap <= 0) | (cap != np.round(cap))][:3].tolist()
    raise ValueError(f"capacities must be positive integers; got {bad}")
  return cap.astype(np.int64)


def check_arrivals(arrivals, dim: int) -> np.ndarray:
  a = np.asarray(arrivals, np.float32)
  if a.ndim != 2 or a.shape[1] != dim:
    raise ValueError(f"arrivals have shape {tuple(a.shape)}; expected "
                     f"(m, {dim}) to match the items' dimension {dim}")
  return a


def _structure(items, weights: str, **kw):
  if hasattr(items, "top"):
    return items
  if weights == "exact":
    return ExactWeights(items)
  if weights == "mips":
    return ClusteredMIPS(items, **kw)
  raise ValueError(f"weights (={weights!r}) must be 'exact' or 'mips'")


def _run(index, capacities, arrivals, choose, update, candidates):
  cap = check_capacities(capacities, index.num_items)
  arrivals = check_arrivals(arrivals, index.dim)
  if candidates < 1:
    raise ValueError(f"candidates (={candidates}) must be >= 1")
  if choose is None:  # greedy on the best item alone: the short path
    def pick(x):
      j, wj = index.best(x)
      return (j, wj) if j >= 0 and wj > 0 else None
  else:
    def pick(x):
      ids, w = index.top(x, candidates)
      if len(ids) == 0:
        return None  # every item is full
      k = choose(ids, w)
      return None if k is None else (ids[k], w[k])
  left = cap.copy()
  out = np.full(arrivals.shape[0], -1, np.int64)
  value = 0.0
  for i, x in enumerate(arrivals):
    got = pick(x)
    if got is None:
      continue
    j, wj = int(got[0]), float(got[1])
    out[i] = j
    value += wj
    left[j] -= 1
    update(j, wj, cap[j])
    if left[j] == 0:
      index.close(j)
  return MatchResult(out, value, int((out < 0).sum()), cap - left)


def greedy(items, capacities, arrivals, *, weights: str = "exact",
           candidates: int = 1, mips_options: dict | None = None
           ) -> MatchResult:
  """Each arrival to the open item of largest positive weight.

  Args:
    items: ``[n, d]`` item embeddings, or a weight structure (``top`` and
      ``close``, and ``best`` for one candidate; it is consumed: items
      close as they fill).
    capacities: ``[n]`` positive integers (or one for all).
    arrivals: ``[m, d]`` arrival embeddings, in arrival order.
    weights: ``"exact"`` (:class:`ExactWeights`) or ``"mips"``
      (:class:`ClusteredMIPS` with ``mips_options``).
    candidates: open items looked at per arrival.
  """
  def first(ids, w):
    return 0 if w[0] > 0 else None

  index = _structure(items, weights, **(mips_options or {}))
  choose = None if candidates == 1 and hasattr(index, "best") else first
  return _run(index, capacities, arrivals, choose, lambda *a: None,
              candidates)


def primal_dual(items, capacities, arrivals, *, weights: str = "exact",
                candidates: int = 16, mips_options: dict | None = None
                ) -> MatchResult:
  """Each arrival to the open item maximising ``w - beta`` (see the module
  doc); arguments as :func:`greedy`."""
  index = _structure(items, weights, **(mips_options or {}))
  beta = np.zeros(index.num_items)

  def choose(ids, w):
    gain = w - beta[ids]
    k = int(np.argmax(gain))
    return k if gain[k] > 0 else None

  def update(j, wj, c):
    e_c = (1.0 + 1.0 / c) ** c
    beta[j] = beta[j] * (1.0 + 1.0 / c) + wj / ((e_c - 1.0) * c)

  return _run(index, capacities, arrivals, choose, update, candidates)


def offline_optimum(items, capacities, arrivals, *, scale: float = 1e6,
                    per_arrival: int = 1) -> MatchResult:
  """The maximum-weight b-matching of all arrivals at once (each arrival
  matched to at most ``per_arrival`` distinct items, item ``j`` at most
  ``c_j`` times, only positive weights used): a min-cost flow with weights
  scaled to integers by ``scale / max weight`` (the value is recomputed
  from the exact weights). With ``per_arrival > 1`` the ``assignment`` is
  the first item of each arrival; ``load`` and ``value`` count all.
  """
  from ortools.graph.python import min_cost_flow

  e = np.asarray(items, np.float32)
  if e.ndim != 2:
    raise ValueError(f"items must be [n, d] embeddings; got shape "
                     f"{tuple(e.shape)}")
  cap = check_capacities(capacities, e.shape[0])
  a = check_arrivals(arrivals, e.shape[1])
  m, n = a.shape[0], e.shape[0]
  w = a @ e.T
  pos = np.argwhere(w > 0)
  out = np.full(m, -1, np.int64)
  if len(pos) == 0:
    return MatchResult(out, 0.0, m, np.zeros(n, np.int64))
  unit = scale / float(w.max())
  # nodes: source 0, arrivals 1..m, items m+1..m+n, sink m+n+1
  src, sink = 0, m + n + 1
  flow = min_cost_flow.SimpleMinCostFlow()
  tails = np.concatenate([np.zeros(m, np.int64), 1 + pos[:, 0],
                          1 + np.arange(m), m + 1 + np.arange(n)])
  heads = np.concatenate([1 + np.arange(m), m + 1 + pos[:, 1],
                          np.full(m, sink), np.full(n, sink)])
  if per_arrival < 1:
    raise ValueError(f"per_arrival (={per_arrival}) must be >= 1")
  caps = np.concatenate([np.full(m, per_arrival, np.int64),
                         np.ones(len(pos), np.int64),
                         np.full(m, per_arrival, np.int64), cap])
  costs = np.concatenate([np.zeros(m, np.int64),
                          -np.round(w[pos[:, 0], pos[:, 1]] * unit).astype(
                              np.int64),
                          np.zeros(m + n, np.int64)])
  flow.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
  supplies = np.zeros(m + n + 2, np.int64)
  supplies[src], supplies[sink] = m * per_arrival, -m * per_arrival
  flow.set_nodes_supplies(np.arange(m + n + 2), supplies)
  status = flow.solve()
  if status != flow.OPTIMAL:
    raise RuntimeError(f"min-cost flow ended with status {status}")
  first = m
  edge_flow = np.array([flow.flow(first + k) for k in range(len(pos))])
  used = pos[edge_flow > 0]
  out[used[::-1, 0]] = used[::-1, 1]  # the first item of each arrival
  load = np.bincount(used[:, 1], minlength=n)
  value = float(w[used[:, 0], used[:, 1]].sum())
  return MatchResult(out, value, int((out < 0).sum()), load)


def adversarial_instance(capacity: int = 1, eps: float = 1e-3):
  """The standard instance on which greedy approaches 1/2: two items of
  ``capacity``; ``capacity`` arrivals of weights (1, 1 + eps), then
  ``capacity`` arrivals of weights (0, 1). Greedy fills item 2 with the
  first wave, so the second gets nothing (value ~capacity), where the
  optimum is 2 * capacity. Returns ``(items, capacities, arrivals)``."""
  items = np.eye(2, dtype=np.float32)
  first = np.tile(np.array([[1.0, 1.0 + eps]], np.float32), (capacity, 1))
  second = np.tile(np.array([[0.0, 1.0]], np.float32), (capacity, 1))
  return items, np.full(2, capacity), np.concatenate([first, second])


def competitive_ratio_bound(algorithm: str) -> float:
  """The stated worst-case ratio (greedy 1/2; the primal-dual's 1 - 1/e
  holds in its free-disposal model with large capacities)."""
  return {"greedy": 0.5, "primal_dual": 1 - 1 / math.e}[algorithm]
