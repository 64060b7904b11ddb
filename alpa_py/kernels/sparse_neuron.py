"""Firing-neuron operators for wide layers with a shifted ReLU.

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
* ``forward`` / ``transpose_apply`` over a union of K neurons: O(nK) and
  O(nKd) -- the gather-and-accumulate operators, with a Pallas kernel each
  (``backend="pallas"``; interpreted off GPU) and a pure-jnp reference.
  ``backend="auto"`` is the reference everywhere for now: the kernels have
  been checked in interpret mode only, not lowered on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from alpa_py.kernels import _backend

BACKENDS = ("auto", "pallas", "reference")
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


# -- gather-and-accumulate over a union of neurons -------------------------------


@dataclasses.dataclass(frozen=True)
class SparseBlockSizes:
  """Tile sizes of the Pallas kernels.

  Attributes:
    block_n: points per program of the forward kernel.
    block_k: union slots per program of the transpose kernel.
  """

  block_n: int = 128
  block_k: int = 16


def _gather_weights(a, ids):
  return jnp.take(a, ids, mode="fill", fill_value=0).astype(jnp.float32)


def forward_reference(corr, ids, a, b):
  """``f[i] = sum_j a[ids_j] * relu(corr[ids_j, i] - b)`` in plain jnp."""
  rows = corr[ids]  # [K, n]
  return jnp.dot(_gather_weights(a, ids), jnp.maximum(rows - b, 0.0),
                 precision=_HIGHEST)


def transpose_apply_reference(corr, X, ids, a, b, v):
  """``G[j] = a[ids_j] * sum_i v_i [corr[ids_j, i] > b] x_i``: J^T v per slot."""
  rows = corr[ids]
  coef = jnp.where(rows > b, v[None, :], 0.0)
  return _gather_weights(a, ids)[:, None] * jnp.dot(coef, X,
                                                    precision=_HIGHEST)


def _forward_kernel(ids_ref, w_ref, b_ref, corr_ref, out_ref, *, num_ids,
                    block_n):
  i = pl.program_id(0)
  cols = pl.ds(i * block_n, block_n)
  b = b_ref[0]

  def step(j, acc):
    row = corr_ref[ids_ref[j], cols]
    return acc + w_ref[j] * jnp.maximum(row - b, 0.0)

  out_ref[cols] = jax.lax.fori_loop(0, num_ids, step,
                                    jnp.zeros((block_n,), jnp.float32))


def _transpose_kernel(ids_ref, w_ref, b_ref, v_ref, corr_ref, x_ref, g_ref, *,
                      block_k):
  c = pl.program_id(0)
  b = b_ref[0]
  v = v_ref[...]
  x = x_ref[...]

  def step(j, carry):
    slot = c * block_k + j
    row = corr_ref[ids_ref[slot], :]
    coef = jnp.where(row > b, v, 0.0)
    g_ref[slot, :] = w_ref[slot] * jnp.sum(coef[:, None] * x, axis=0)
    return carry

  jax.lax.fori_loop(0, block_k, step, 0)


def _pad1(x, multiple, value):
  extra = -x.shape[0] % multiple
  return jnp.pad(x, (0, extra), constant_values=value) if extra else x


def forward_pallas(corr, ids, a, b, *, blocks=SparseBlockSizes(),
                   interpret=None):
  """Pallas version of :func:`forward_reference`.

  One program per tile of ``block_n`` points loops over the union's slots,
  loading each firing neuron's correlations (a contiguous row slice) and
  accumulating ``a_r * relu(c - b)`` in float32.
  """
  interpret = _backend.default_interpret() if interpret is None else interpret
  m_pad, n = corr.shape
  # tiles of block_n points when they divide n, else one tile (no copy of
  # the index to pad it)
  bn = blocks.block_n if n % blocks.block_n == 0 else n
  w = _gather_weights(a, ids)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  return pl.pallas_call(
      functools.partial(_forward_kernel, num_ids=ids.shape[0], block_n=bn),
      out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
      grid=(n // bn,),
      in_specs=[full(ids.shape), full(w.shape), full((1,)), full(corr.shape)],
      out_specs=full((n,)),
      interpret=interpret,
  )(ids, w, jnp.reshape(jnp.float32(b), (1,)), corr)


def transpose_apply_pallas(corr, X, ids, a, b, v, *, blocks=SparseBlockSizes(),
                           interpret=None):
  """Pallas version of :func:`transpose_apply_reference`.

  One program per ``block_k`` union slots; each slot gathers its neuron's
  correlation row, masks the firing points and accumulates ``v_i x_i``.
  """
  interpret = _backend.default_interpret() if interpret is None else interpret
  m_pad = corr.shape[0]
  k = ids.shape[0]
  ids_p = _pad1(ids, blocks.block_k, m_pad - 1)  # a padding row: never fires
  w = _gather_weights(a, ids_p)
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  g = pl.pallas_call(
      functools.partial(_transpose_kernel, block_k=blocks.block_k),
      out_shape=jax.ShapeDtypeStruct((ids_p.shape[0], X.shape[1]), jnp.float32),
      grid=(ids_p.shape[0] // blocks.block_k,),
      in_specs=[full(ids_p.shape), full(w.shape), full((1,)), full(v.shape),
                full(corr.shape), full(X.shape)],
      out_specs=full((ids_p.shape[0], X.shape[1])),
      interpret=interpret,
  )(ids_p, w, jnp.reshape(jnp.float32(b), (1,)), v.astype(jnp.float32), corr,
    X.astype(jnp.float32))
  return g[:k]


def _resolve(backend: str) -> str:
  # "auto" is the jnp reference on every platform: these kernels have only
  # been run interpreted (no GPU lowering checked yet); ask for "pallas".
  return _backend.resolve(backend, BACKENDS, auto_on_gpu="reference")


def forward(index: FiringIndex, ids, a, b, *, backend: str = "auto"):
  """Outputs ``f(x_i) = sum_{r in ids} a_r relu(<w_r, x_i> - b)`` from the
  stored correlations (no recomputation): O(nK)."""
  if _resolve(backend) == "pallas":
    return forward_pallas(index.corr, ids, a, b)
  return forward_reference(index.corr, ids, a, b)


def transpose_apply(index: FiringIndex, ids, a, b, v, *,
                    backend: str = "auto"):
  """``J^T v`` restricted to the neurons ``ids``: row j is
  ``a_r sum_i v_i [r fires on i] x_i`` for ``r = ids[j]``: O(nKd)."""
  if _resolve(backend) == "pallas":
    return transpose_apply_pallas(index.corr, index.X, ids, a, b, v)
  return transpose_apply_reference(index.corr, index.X, ids, a, b, v)
