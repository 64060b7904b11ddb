"""Firing-neuron index: which neurons of a wide layer fire on which inputs.

For a layer with weights ``W[m, d]`` over a training set ``X[n, d]`` and a
shifted ReLU (neuron ``r`` fires on point ``i`` when ``<w_r, x_i> > b``), the
index keeps the correlations ``C[n, m] = X W^T`` and, as the upper level of
the tree of Alman, Liang, Song, Zhang and Zhuo (NeurIPS '23), the maximum of
each block of ``block`` neurons per point. A query looks only inside blocks
whose maximum passes the threshold; an update recomputes the correlations of
the changed neurons only.

Costs (n points, m neurons, d features, block size B, k changed neurons):

* ``build``: one ``n x d x m`` matmul, O(nmd), plus O(nm) for the maxima.
* ``query(b)``: O(n m / B) to find candidate blocks, then O(n c B) to scan
  the ``c`` candidate blocks (at most ``max_blocks`` per point; beyond that
  the overflow flag is set and every block is scanned, the dense fallback).
* ``update``: O(n k d) for the new correlations and O(n k B) for the maxima
  of the touched blocks, instead of O(nmd) for a rebuild.

This module is the index only; the sparse forward/backward operators, the
Pallas gather kernel and the ``SparseMLP`` layer are not here yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FiringIndex:
  """Correlations and block maxima of a layer over a fixed training set.

  Attributes:
    X: ``[n, d]`` training points.
    W: ``[m, d]`` current neuron weights.
    corr: ``[n, m_pad]`` correlations ``X W^T`` (padding: -inf).
    block_max: ``[n, m_pad / block]`` per-block maxima of ``corr``.
  """

  X: jax.Array
  W: jax.Array
  corr: jax.Array
  block_max: jax.Array
  block: int = dataclasses.field(metadata=dict(static=True), default=128)

  @classmethod
  def build(cls, W, X, *, block: int = 128) -> "FiringIndex":
    """Preprocesses the correlations once: O(nmd)."""
    W, X = jnp.asarray(W, jnp.float32), jnp.asarray(X, jnp.float32)
    if W.ndim != 2 or X.ndim != 2 or W.shape[1] != X.shape[1]:
      raise ValueError(f"expected W[m, d] and X[n, d]; got W{tuple(W.shape)}, "
                       f"X{tuple(X.shape)}")
    m = W.shape[0]
    m_pad = -(-m // block) * block
    corr = jnp.full((X.shape[0], m_pad), -jnp.inf, jnp.float32)
    corr = corr.at[:, :m].set(jnp.dot(X, W.T, precision=jax.lax.Precision.HIGHEST))
    return cls(X, W, corr, _block_max(corr, block), block)

  @property
  def num_neurons(self) -> int:
    return self.W.shape[0]

  def query(self, b: float, *, capacity: int | None = None,
            max_blocks: int | None = None):
    """Neurons firing on each point: ``(ids, counts)``, ``ids[i, :counts[i]]``.

    Args:
      b: threshold (fires when correlation > b).
      capacity: width of ``ids`` (default: all neurons).
      max_blocks: candidate blocks scanned per point (default: all).

    Returns:
      ``(ids [n, capacity] int32, counts [n] int32)``; unused slots of ``ids``
      are -1. Also ``overflow`` ([n] bool): more neurons fired than
      ``capacity`` (ids then hold the first ``capacity``), or more blocks
      passed than ``max_blocks`` (all blocks were then scanned).
    """
    ids, counts, overflow = _query(self, jnp.float32(b),
                                   capacity or self.num_neurons,
                                   max_blocks or self.corr.shape[1] // self.block)
    return ids, counts, overflow

  def update(self, neuron_ids, new_rows) -> "FiringIndex":
    """The index after replacing rows ``neuron_ids`` of ``W``: O(nkd)."""
    neuron_ids = jnp.asarray(neuron_ids, jnp.int32)
    new_rows = jnp.asarray(new_rows, jnp.float32)
    if new_rows.shape != (neuron_ids.shape[0], self.W.shape[1]):
      raise ValueError(f"new_rows has shape {tuple(new_rows.shape)}; expected "
                       f"({neuron_ids.shape[0]}, {self.W.shape[1]})")
    W = self.W.at[neuron_ids].set(new_rows)
    cols = jnp.dot(self.X, new_rows.T, precision=jax.lax.Precision.HIGHEST)
    corr = self.corr.at[:, neuron_ids].set(cols)
    blocks = neuron_ids // self.block
    touched = corr.reshape(corr.shape[0], -1, self.block)[:, blocks].max(-1)
    block_max = self.block_max.at[:, blocks].set(touched)
    return dataclasses.replace(self, W=W, corr=corr, block_max=block_max)


def _block_max(corr, block):
  return corr.reshape(corr.shape[0], -1, block).max(-1)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _query(index: FiringIndex, b, capacity: int, max_blocks: int):
  n, m_pad = index.corr.shape
  nb, blk = m_pad // index.block, index.block
  passing = index.block_max > b  # [n, nb]
  n_pass = passing.sum(1)
  block_overflow = n_pass > max_blocks
  # candidate blocks first (stable), at most max_blocks of them
  order = jnp.argsort(~passing, axis=1, stable=True)[:, :max_blocks]
  cand = jnp.take_along_axis(index.corr.reshape(n, nb, blk), order[..., None],
                             axis=1)  # [n, max_blocks, blk]
  valid_block = jnp.take_along_axis(passing, order, axis=1)
  neuron = order[..., None] * blk + jnp.arange(blk)
  fire = (cand > b) & valid_block[..., None]
  fire, neuron = fire.reshape(n, -1), neuron.reshape(n, -1)
  # dense fallback where too many blocks passed
  dense_fire = index.corr > b
  dense_neuron = jnp.broadcast_to(jnp.arange(m_pad), (n, m_pad))
  width = max(fire.shape[1], m_pad)
  pad = lambda a, v: jnp.pad(a, ((0, 0), (0, width - a.shape[1])),
                             constant_values=v)
  fire = jnp.where(block_overflow[:, None], pad(dense_fire, False), pad(fire, False))
  neuron = jnp.where(block_overflow[:, None], pad(dense_neuron, 0), pad(neuron, 0))
  counts = fire.sum(1).astype(jnp.int32)
  pick = jnp.argsort(~fire, axis=1, stable=True)[:, :capacity]
  ids = jnp.where(jnp.take_along_axis(fire, pick, axis=1),
                  jnp.take_along_axis(neuron, pick, axis=1), -1).astype(jnp.int32)
  if ids.shape[1] < capacity:
    ids = jnp.pad(ids, ((0, 0), (0, capacity - ids.shape[1])), constant_values=-1)
  overflow = (counts > capacity) | block_overflow
  return ids, jnp.minimum(counts, capacity), overflow
