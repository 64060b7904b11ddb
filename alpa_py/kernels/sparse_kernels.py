"""Gather-and-accumulate operators over a union of firing neurons.

Given a :class:`~alpa_py.kernels.firing_index.FiringIndex` (the stored
correlations ``corr[m_pad, n]`` of a shifted-ReLU layer over its training
set) and a union of K neuron ids, :func:`forward` (the outputs, O(nK)) and
:func:`transpose_apply` (``J^T v`` of the union's rows, O(nKd)) read the
stored correlations instead of recomputing them (n points, d features).

Each has a Pallas kernel (``backend="pallas"``; interpreted off GPU) and a
pure-jnp reference. ``backend="auto"`` is the reference everywhere for now:
the kernels have been checked in interpret mode only, not lowered on a GPU.

:func:`dense_forward` is the same layer computed densely from ``W`` and
``X`` (O(nmd)), with the index's matmul precision so that both agree.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from alpa_py.kernels import _backend
from alpa_py.kernels import tuning
from alpa_py.kernels.firing_index import correlations
from alpa_py.kernels.firing_index import FiringIndex

BACKENDS = ("auto", "pallas", "reference")
_HIGHEST = jax.lax.Precision.HIGHEST


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


def _pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def _tile(block: int, size: int) -> int:
  """A power-of-two tile of at most ``block`` (itself rounded up to a power
  of two), no wider than ``size`` rounded up: Triton's loads and stores
  need power-of-two sizes, so any width is covered by masked tiles."""
  return min(_pow2(block), _pow2(size))


def _forward_kernel(ids_ref, w_ref, b_ref, corr_ref, out_ref, *, num_ids,
                    block_n, n):
  i = pl.program_id(0)
  start = i * block_n
  inside = start + jnp.arange(block_n) < n
  b = b_ref[0]

  def step(j, acc):
    row = plt.load(corr_ref.at[ids_ref[j], pl.ds(start, block_n)],
                   mask=inside, other=-jnp.inf)
    return acc + w_ref[j] * jnp.maximum(row - b, 0.0)

  acc = jax.lax.fori_loop(0, num_ids, step,
                          jnp.zeros((block_n,), jnp.float32))
  plt.store(out_ref.at[pl.ds(start, block_n)], acc, mask=inside)


def _transpose_kernel(ids_ref, w_ref, b_ref, v_ref, corr_ref, x_ref, g_ref, *,
                      block_k, block_n, n, d):
  c = pl.program_id(0)
  b = b_ref[0]
  d_pad = _pow2(d)
  feat = jnp.arange(d_pad) < d
  tiles = -(-n // block_n)

  def slot_step(j, carry):
    slot = c * block_k + j
    neuron = ids_ref[slot]

    def tile_step(t, acc):
      start = t * block_n
      inside = start + jnp.arange(block_n) < n
      row = plt.load(corr_ref.at[neuron, pl.ds(start, block_n)],
                     mask=inside, other=-jnp.inf)
      v = plt.load(v_ref.at[pl.ds(start, block_n)], mask=inside, other=0.0)
      x = plt.load(x_ref.at[pl.ds(start, block_n), pl.ds(0, d_pad)],
                   mask=inside[:, None] & feat[None, :], other=0.0)
      coef = jnp.where(row > b, v, 0.0)
      return acc + jnp.sum(coef[:, None] * x, axis=0)

    acc = jax.lax.fori_loop(0, tiles, tile_step,
                            jnp.zeros((d_pad,), jnp.float32))
    plt.store(g_ref.at[slot, pl.ds(0, d_pad)], w_ref[slot] * acc, mask=feat)
    return carry

  jax.lax.fori_loop(0, block_k, slot_step, 0)


def _pad1(x, multiple, value):
  extra = -x.shape[0] % multiple
  return jnp.pad(x, (0, extra), constant_values=value) if extra else x


def _full(shape):
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


# the Triton backend, named: it lowers these gathers (masked, power-of-two
# tiles); on jax 0.10 a pallas_call without parameters lowers through
# Mosaic GPU, which needs 128-element-aligned copies
_TRITON = plt.CompilerParams(num_warps=4, num_stages=1)


def forward_pallas(corr, ids, a, b, *, blocks=SparseBlockSizes(),
                   interpret=None):
  """Pallas version of :func:`forward_reference`.

  One program per tile of ``block_n`` points (a power of two; the last tile
  masked, so any ``n`` works without copying the index) loops over the
  union's slots, loading each firing neuron's correlations (a contiguous
  row slice) and accumulating ``a_r * relu(c - b)`` in float32.
  """
  interpret = _backend.default_interpret() if interpret is None else interpret
  n = corr.shape[1]
  bn = _tile(blocks.block_n, n)
  w = _gather_weights(a, ids)
  return pl.pallas_call(
      functools.partial(_forward_kernel, num_ids=ids.shape[0], block_n=bn,
                        n=n),
      out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
      grid=(pl.cdiv(n, bn),),
      in_specs=[_full(ids.shape), _full(w.shape), _full((1,)),
                _full(corr.shape)],
      out_specs=_full((n,)),
      interpret=interpret,
      compiler_params=_TRITON,
  )(ids, w, jnp.reshape(jnp.float32(b), (1,)), corr)


def transpose_apply_pallas(corr, X, ids, a, b, v, *, blocks=SparseBlockSizes(),
                           interpret=None):
  """Pallas version of :func:`transpose_apply_reference`.

  One program per ``block_k`` union slots; each slot walks its neuron's
  correlation row in masked power-of-two tiles of points, masks the firing
  points and accumulates ``v_i x_i`` over the (power-of-two padded,
  masked) features.
  """
  interpret = _backend.default_interpret() if interpret is None else interpret
  m_pad, n = corr.shape
  k, d = ids.shape[0], X.shape[1]
  ids_p = _pad1(ids, blocks.block_k, m_pad - 1)  # a padding row: never fires
  w = _gather_weights(a, ids_p)
  # a tile of points times the padded features stays a modest block
  bn = _tile(max(1, blocks.block_n * 64 // _pow2(d)), n)
  g = pl.pallas_call(
      functools.partial(_transpose_kernel, block_k=blocks.block_k,
                        block_n=bn, n=n, d=d),
      out_shape=jax.ShapeDtypeStruct((ids_p.shape[0], d), jnp.float32),
      grid=(ids_p.shape[0] // blocks.block_k,),
      in_specs=[_full(ids_p.shape), _full(w.shape), _full((1,)),
                _full(v.shape), _full(corr.shape), _full(X.shape)],
      out_specs=_full((ids_p.shape[0], d)),
      interpret=interpret,
      compiler_params=_TRITON,
  )(ids_p, w, jnp.reshape(jnp.float32(b), (1,)), v.astype(jnp.float32), corr,
    X.astype(jnp.float32))
  return g[:k]


def step_sizes(index: FiringIndex, capacity: int) -> dict:
  """The sizes ``auto`` looks up in the kernel records (op ``sparse_step``)."""
  return dict(neurons=index.num_neurons, points=index.num_points,
              features=index.X.shape[1], capacity=int(capacity))


def resolve_backend(backend: str, sizes: dict | None = None) -> str:
  """``auto``: the backend recorded fastest for the sparse step at the
  nearest size on this device kind (``alpa_py.kernels.tuning``, written by
  ``benchmarks/sparse_neurons.py --record``), else the jnp reference on
  every platform (the Pallas kernels win nowhere until measured so)."""
  kind = _backend.resolve(backend, BACKENDS, auto_on_gpu="reference")
  if backend == "auto" and sizes is not None:
    kind = tuning.choose("sparse_step", jnp.float32, sizes, default=kind)
  return kind


def forward(index: FiringIndex, ids, a, b, *, backend: str = "auto"):
  """Outputs ``f(x_i) = sum_{r in ids} a_r relu(<w_r, x_i> - b)`` from the
  stored correlations (no recomputation): O(nK)."""
  if resolve_backend(backend) == "pallas":
    return forward_pallas(index.corr, ids, a, b)
  return forward_reference(index.corr, ids, a, b)


def transpose_apply(index: FiringIndex, ids, a, b, v, *,
                    backend: str = "auto"):
  """``J^T v`` restricted to the neurons ``ids``: row j is
  ``a_r sum_i v_i [r fires on i] x_i`` for ``r = ids[j]``: O(nKd)."""
  if resolve_backend(backend) == "pallas":
    return transpose_apply_pallas(index.corr, index.X, ids, a, b, v)
  return transpose_apply_reference(index.corr, index.X, ids, a, b, v)


def dense_forward(W, a, X, b):
  """``relu(X W^T - b) a`` with the index's matmul precision."""
  return jnp.dot(a, jnp.maximum(correlations(W, X) - b, 0.0),
                 precision=_HIGHEST)
