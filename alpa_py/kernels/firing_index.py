"""The firing-neuron index of a wide layer with a shifted ReLU.

For a layer with weights ``W[m, d]`` over a training set ``X[n, d]`` and the
shifted ReLU ``relu(<w_r, x_i> - b)`` with ``b > 0``, neuron ``r`` *fires* on
point ``i`` when ``<w_r, x_i> > b``. With a large ``b`` few neurons fire, and
gradient descent changes only the neurons that fired on some point. Following
Alman, Liang, Song, Zhang and Zhuo (NeurIPS '23), :class:`FiringIndex` keeps
the correlations ``<w_r, x_i>`` (computed once, O(nmd)) and two upper levels
of a tree over them, so that an iteration touches only firing neurons:

* ``block_bound[nb, n]``: per point, an upper bound on the correlations of
  each block of ``block`` neurons (exact after ``build``/``refresh``; an
  update raises it where a new value exceeds it, so it stays a valid bound
  and whole blocks below the threshold are skipped by a query);
* ``neuron_max[m]``: per neuron, the maximum correlation over all points --
  neuron ``r`` fires on some point iff ``neuron_max[r] > b``. The union of
  the firing sets is what bounds the cost of a training step.

Correlations are stored neuron-major (``corr[m_pad, n]``) so that the rows of
the firing neurons are contiguous gathers. Row ``m`` (and any row past it) is
padding holding ``-inf``; it serves as the id of an empty slot.

Costs (n points, m neurons, d features, block size B, k changed neurons,
K union capacity):

* ``FiringIndex.build``: one matmul, O(nmd), plus O(nm) for the two levels.
* ``query(b)``: O(nm/B) to test the block bounds, then O(ncB) to scan the
  ``c`` candidate blocks of each point (at most ``max_blocks``; if a point
  has more, the query scans every block densely, O(nm)).
* ``firing_union(b, K)``: O(m) on ``neuron_max`` (no d, no n factor).
* ``update(ids, rows)``: O(nkd) for the new correlations and O(nk) for the
  two levels, instead of O(nmd) for a rebuild.

The operators that read the index over a union of K neurons (outputs and
``J^T v``) are in :mod:`alpa_py.kernels.sparse_kernels`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_warned_threshold = False


def check_threshold(b) -> None:
  """Warns once per process when ``b <= 0`` (nothing sparse to exploit)."""
  global _warned_threshold
  try:
    value = float(b)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return  # traced: checked where the value is concrete
  if value <= 0 and not _warned_threshold:
    _warned_threshold = True
    warnings.warn(
        f"firing threshold b (={value}) <= 0: about half of the neurons fire "
        "on every point, so the sparse operators do dense work with extra "
        "overhead; use b > 0 (a shifted ReLU) to benefit", stacklevel=3)


class FiringSets(NamedTuple):
  """Padded per-point firing sets: ``ids[i, :counts[i]]`` fire on point i.

  ``overflow[i]``: more than ``ids.shape[1]`` neurons fired on point i
  (``counts[i]`` is then the true count and ``ids`` hold the first ones).
  """

  ids: jax.Array
  counts: jax.Array
  overflow: jax.Array


class Union(NamedTuple):
  """The neurons firing on at least one point, padded to a capacity K.

  ``ids[:count]`` are the neurons (ascending); the remaining slots hold the
  padding row id ``m``. ``overflow``: more than K neurons fire (``ids`` then
  hold the first K; callers must fall back to dense work).
  """

  ids: jax.Array
  count: jax.Array
  overflow: jax.Array

  @property
  def valid(self):
    return jnp.arange(self.ids.shape[0]) < self.count


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FiringIndex:
  """Correlations and tree levels of a layer over a fixed training set.

  Attributes:
    X: ``[n, d]`` training points.
    W: ``[m, d]`` current neuron weights.
    corr: ``[m_pad, n]`` correlations ``W X^T`` (padding rows: -inf).
    block_bound: ``[m_pad / block, n]`` upper bounds of each block's rows.
    neuron_max: ``[m_pad]`` maximum correlation of each neuron over points.
  """

  X: jax.Array
  W: jax.Array
  corr: jax.Array
  block_bound: jax.Array
  neuron_max: jax.Array
  block: int = dataclasses.field(metadata=dict(static=True), default=128)

  @classmethod
  def build(cls, W, X, *, block: int = 128) -> "FiringIndex":
    """Preprocesses the correlations once: O(nmd).

    ``W`` and ``X`` are copied: training steps donate the index's buffers,
    and the caller's arrays must stay valid.
    """
    W = jnp.array(W, jnp.float32, copy=True)
    X = jnp.array(X, jnp.float32, copy=True)
    if W.ndim != 2 or X.ndim != 2 or W.shape[1] != X.shape[1]:
      raise ValueError(f"expected W[m, d] and X[n, d] with the same d; got "
                       f"W{tuple(W.shape)}, X{tuple(X.shape)}")
    if X.shape[0] < 1 or W.shape[0] < 1:
      raise ValueError(f"need at least one point and one neuron; got "
                       f"W{tuple(W.shape)}, X{tuple(X.shape)}")
    if block < 1:
      raise ValueError(f"block (={block}) must be positive")
    m, n = W.shape[0], X.shape[0]
    m_pad = -(-(m + 1) // block) * block  # at least one padding row
    corr = jnp.full((m_pad, n), -jnp.inf, jnp.float32)
    corr = corr.at[:m].set(correlations(W, X))
    return cls(X, W, corr, _block_max(corr, block), corr.max(1), block)

  @property
  def num_neurons(self) -> int:
    return self.W.shape[0]

  @property
  def num_points(self) -> int:
    return self.X.shape[0]

  def refresh(self) -> "FiringIndex":
    """Recomputes the block bounds exactly (O(nm)); queries then skip more."""
    return dataclasses.replace(self, block_bound=_block_max(self.corr,
                                                            self.block))

  def query(self, b, *, capacity: int | None = None,
            max_blocks: int | None = None):
    """Neurons firing on each point: ``(ids, counts)``, ``ids[i, :counts[i]]``.

    Args:
      b: threshold (a neuron fires when its correlation is > b).
      capacity: width of ``ids`` (default: all neurons). When more neurons
        fire on some point, a warning is given and the result is recomputed
        at the width needed (the dense fallback); nothing is truncated.
      max_blocks: candidate blocks scanned per point before the query goes
        dense (default: all blocks).

    Returns:
      ``(ids [n, width] int32, counts [n] int32)``; unused slots hold -1.
      Under ``jax.jit`` with a ``capacity``, use :meth:`query_padded`, which
      returns the overflow flag instead of checking it.
    """
    check_threshold(b)
    sets = self.query_padded(b, capacity=capacity, max_blocks=max_blocks)
    if capacity is None or capacity >= self.num_neurons:
      return sets.ids, sets.counts
    try:
      overflow = bool(jnp.any(sets.overflow))
    except jax.errors.ConcretizationTypeError:
      raise TypeError("FiringIndex.query(capacity=...) checks the capacity on "
                      "the host; under jax.jit use query_padded, which "
                      "returns the overflow flag") from None
    if overflow:
      need = int(jnp.max(sets.counts))
      warnings.warn(f"query capacity (={capacity}) overflowed: up to {need} "
                    f"neurons fire on one point; returning the full result "
                    f"(width {need})", stacklevel=2)
      sets = self.query_padded(b, capacity=need, max_blocks=max_blocks)
    return sets.ids, sets.counts

  def query_padded(self, b, *, capacity: int | None = None,
                   max_blocks: int | None = None) -> FiringSets:
    """:meth:`query` with a fixed width and an overflow flag (jit-friendly)."""
    nb = self.corr.shape[0] // self.block
    for name, v in (("capacity", capacity), ("max_blocks", max_blocks)):
      if v is not None and int(v) < 1:
        raise ValueError(f"{name} (={v}) must be >= 1 (or None for all)")
    capacity = self.num_neurons if capacity is None else int(capacity)
    max_blocks = nb if max_blocks is None else min(int(max_blocks), nb)
    return _query(self, jnp.float32(b), capacity, max_blocks)

  def firing_union(self, b, capacity: int) -> Union:
    """Neurons that fire on at least one point, padded to ``capacity``: O(m)."""
    return _firing_union(self.neuron_max, jnp.float32(b), int(capacity),
                         self.num_neurons)

  def update(self, neuron_ids, new_rows) -> "FiringIndex":
    """The index after replacing (distinct) rows ``neuron_ids`` of W: O(nkd)."""
    neuron_ids = jnp.asarray(neuron_ids, jnp.int32)
    new_rows = jnp.asarray(new_rows, jnp.float32)
    if neuron_ids.ndim != 1:
      raise ValueError(f"neuron_ids must be a 1-D list of neuron ids; got "
                       f"shape {tuple(neuron_ids.shape)}")
    if new_rows.shape != (neuron_ids.shape[0], self.W.shape[1]):
      raise ValueError(f"new_rows has shape {tuple(new_rows.shape)}; expected "
                       f"({neuron_ids.shape[0]}, {self.W.shape[1]}) for "
                       f"neuron_ids of shape {tuple(neuron_ids.shape)}")
    if not isinstance(neuron_ids, jax.core.Tracer) and neuron_ids.size:
      lo, hi = int(neuron_ids.min()), int(neuron_ids.max())
      if lo < 0 or hi >= self.num_neurons:
        raise ValueError(f"neuron_ids must lie in [0, {self.num_neurons}); "
                         f"got values from {lo} to {hi}")
    return self.update_masked(neuron_ids, new_rows,
                              jnp.ones(neuron_ids.shape, bool))

  def update_masked(self, neuron_ids, new_rows, valid) -> "FiringIndex":
    """:meth:`update` of the slots where ``valid`` (padded id lists); ids
    outside ``[0, m)`` are never written (the padding rows stay -inf)."""
    m_pad = self.corr.shape[0]
    rows = correlations(new_rows, self.X)  # [k, n]
    ok = valid & (neuron_ids >= 0) & (neuron_ids < self.num_neurons)
    drop = jnp.where(ok, neuron_ids, m_pad)  # out of range: not written
    W = self.W.at[drop].set(new_rows, mode="drop")
    corr = self.corr.at[drop].set(rows, mode="drop")
    neuron_max = self.neuron_max.at[drop].set(rows.max(1), mode="drop")
    block_bound = self.block_bound.at[drop // self.block].max(rows,
                                                              mode="drop")
    return dataclasses.replace(self, W=W, corr=corr, neuron_max=neuron_max,
                               block_bound=block_bound)


def choose_capacity(union: int, num_neurons: int, headroom: float = 1.25) -> int:
  """Union slots for ``union`` firing neurons: ``headroom`` x the count,
  rounded up to an eighth of a power of two (few distinct compiled sizes,
  little padding), at least 64 and at most ``num_neurons``."""
  want = max(64, math.ceil(headroom * union))
  step = 1 << max(0, math.ceil(math.log2(want)) - 3)
  return min(-(-want // step) * step, num_neurons)


def correlations(W, X):
  """``W X^T`` in full float32 precision (the index and dense paths agree)."""
  return jnp.dot(W, X.T, precision=_HIGHEST)


def compact(mask, capacity: int, *, fill):
  """Positions of the True entries of a 1-D mask, padded with ``fill``: O(m)."""
  pos = jnp.cumsum(mask) - 1
  slot = jnp.where(mask & (pos < capacity), pos, capacity)
  out = jnp.full((capacity,), fill, jnp.int32)
  return out.at[slot].set(jnp.arange(mask.shape[0], dtype=jnp.int32),
                          mode="drop")


@functools.partial(jax.jit, static_argnums=(2, 3))
def _firing_union(neuron_max, b, capacity: int, num_neurons: int) -> Union:
  fires = neuron_max > b
  count = fires.sum().astype(jnp.int32)
  ids = compact(fires, capacity, fill=num_neurons)
  return Union(ids, count, count > capacity)


def _block_max(corr, block):
  return corr.reshape(-1, block, corr.shape[1]).max(1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _query(index: FiringIndex, b, capacity: int, max_blocks: int):
  m_pad, n = index.corr.shape
  blk = index.block
  nb = m_pad // blk
  passing = index.block_bound.T > b  # [n, nb]
  any_dense = jnp.any(passing.sum(1) > max_blocks)
  points = jnp.arange(n)

  def sparse_scan():
    # candidate blocks of each point, first max_blocks of them
    order = jax.vmap(lambda p: compact(p, max_blocks, fill=0))(passing)
    ok = jnp.arange(max_blocks) < passing.sum(1)[:, None]
    corr3 = index.corr.reshape(nb, blk, n)
    cand = corr3[order, :, points[:, None]]  # [n, max_blocks, blk]
    fire = (cand > b) & ok[..., None]
    neuron = order[..., None] * blk + jnp.arange(blk)
    pad = ((0, 0), (0, m_pad - max_blocks * blk))  # to the dense width
    return (jnp.pad(fire.reshape(n, -1), pad),
            jnp.pad(neuron.reshape(n, -1).astype(jnp.int32), pad))

  def dense_scan():
    fire = index.corr.T > b
    return fire, jnp.broadcast_to(jnp.arange(m_pad, dtype=jnp.int32),
                                  fire.shape)

  if max_blocks >= nb:  # scanning every candidate block is the dense scan
    fire, neuron = dense_scan()
  else:
    fire, neuron = jax.lax.cond(any_dense, dense_scan, sparse_scan)
  counts = fire.sum(1).astype(jnp.int32)
  slots = jax.vmap(lambda f: compact(f, capacity, fill=-1))(fire)
  ids = jnp.where(slots >= 0, jnp.take_along_axis(neuron, jnp.maximum(slots, 0),
                                                  axis=1), -1)
  return FiringSets(ids.astype(jnp.int32), counts, counts > capacity)
