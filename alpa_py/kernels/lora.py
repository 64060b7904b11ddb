"""Batched multi-LoRA operators (SGMV / BGMV), in the manner of Punica.

For tokens ``x[T, H_in]``, adapters ``A[N, H_in, r]``, ``B[N, r, H_out]`` and
per-adapter ``scale[N]``, each token ``t`` with adapter ``i = idx[t]`` gets

    y[t] = scale[i] * (x[t] @ A[i]) @ B[i]        (0 where i == -1)

returned as the update to add to the base layer's output. Two layouts:

* ``bgmv``: an adapter id per token (decode batches);
* ``sgmv``: contiguous segments of tokens, one adapter per segment (prefill).

``ranks[N]`` (optional) gives adapters of different ranks padded to ``r``:
columns past an adapter's rank are masked out. The shrink ``x @ A`` is
accumulated and kept in float32; the result has ``x``'s dtype.

Backends (``backend=``):

* ``pallas``: for ``sgmv``, tokens are grouped by segment into tiles of
  ``block_t`` tokens, each tile belonging to one adapter; one program per
  tile loads its adapter's ``A`` and ``B`` once and does the shrink (looping
  over ``H_in`` in ``block_k`` chunks) and the expand (over ``H_out`` in
  ``block_o`` chunks) on the matrix units. Tiles of no adapter are skipped.
  For ``bgmv`` (decode: few tokens, any adapters) one fused program per
  token does the shrink and the expand (its ``r`` values stay in
  registers), with no sorting of tokens, no copy of the adapters (masked
  power-of-two tiles cover any size) and no work for tokens without an
  adapter. Both lower through Pallas's Triton backend, named explicitly. Both read each adapter they use
  about once per tile/token, the operator's memory bound. On CPU they run
  with ``interpret=True``.
* ``ragged_dot``: tokens sorted by adapter, then two ``jax.lax.ragged_dot``.
* ``reference``: per-token gather of the adapter weights, in plain jnp.
* ``auto``: the backend measured fastest at the nearest recorded size on
  this device kind (:mod:`alpa_py.kernels.tuning`, written by
  ``benchmarks/lora_kernels.py --record``); with no records, ``pallas`` on
  GPU and elsewhere ``reference`` (gather + batched matmul), which on CPU
  runs 7-15x faster than XLA's ``ragged_dot`` there.

Gradients: a ``custom_vjp`` whose backward is the ``ragged_dot``
formulation's (for ``x``, ``A``, ``B`` and ``scale``).
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

BACKENDS = ("auto", "pallas", "ragged_dot", "reference")


@dataclasses.dataclass(frozen=True)
class LoRABlockSizes:
  """Tile sizes of the Pallas kernel.

  Attributes:
    block_t: tokens per tile (a tile holds one adapter's tokens).
    block_k: ``H_in`` chunk of the shrink.
    block_o: ``H_out`` chunk of the expand.
    min_rank: ranks are padded up to at least this (matrix units want 16).
  """

  block_t: int = 16
  block_k: int = 128
  block_o: int = 128
  min_rank: int = 16


# -- reference ---------------------------------------------------------------


def bgmv_reference(x, A, B, adapter_ids, scale, *, ranks=None):
  """Per-token gather of each token's adapter; plain jnp."""
  ids = jnp.asarray(adapter_ids, jnp.int32)
  safe = jnp.maximum(ids, 0)
  a = A[safe].astype(jnp.float32)  # [T, H_in, r]
  b = B[safe].astype(jnp.float32)  # [T, r, H_out]
  hi = jax.lax.Precision.HIGHEST
  shrink = jnp.einsum("th,thr->tr", x.astype(jnp.float32), a, precision=hi)
  shrink = shrink * _rank_mask(ranks, safe, A.shape[-1])
  y = jnp.einsum("tr,tro->to", shrink, b, precision=hi)
  s = jnp.where(ids >= 0, scale[safe].astype(jnp.float32), 0.0)
  return (y * s[:, None]).astype(x.dtype)


def segments_to_ids(seg_starts, seg_adapter_ids, num_tokens: int):
  """Per-token adapter ids of an SGMV segment layout."""
  seg_starts = jnp.asarray(seg_starts, jnp.int32)
  seg = jnp.searchsorted(seg_starts[1:], jnp.arange(num_tokens), side="right")
  return jnp.asarray(seg_adapter_ids, jnp.int32)[seg]


def sgmv_reference(x, A, B, seg_starts, seg_adapter_ids, scale, *, ranks=None):
  ids = segments_to_ids(seg_starts, seg_adapter_ids, x.shape[0])
  return bgmv_reference(x, A, B, ids, scale, ranks=ranks)


def _rank_mask(ranks, safe_ids, r):
  if ranks is None:
    return 1.0
  cols = jnp.arange(r)[None, :]
  return (cols < jnp.asarray(ranks)[safe_ids][:, None]).astype(jnp.float32)


# -- ragged_dot ----------------------------------------------------------------


def _ragged(x, A, B, ids, scale, ranks):
  n = A.shape[0]
  valid = ids >= 0
  key = jnp.where(valid, ids, n)  # no-adapter tokens sort last
  order = jnp.argsort(key, stable=True)
  xs = x[order]
  sizes = jnp.bincount(jnp.where(valid, ids, 0), weights=valid.astype(jnp.int32),
                       length=n).astype(jnp.int32)
  shrink = jax.lax.ragged_dot(xs, A, sizes, preferred_element_type=jnp.float32,
                              precision=_precision(x.dtype))
  sid = jnp.maximum(key[order], 0)
  sid = jnp.minimum(sid, n - 1)
  shrink = shrink * _rank_mask(ranks, sid, A.shape[-1])
  y = jax.lax.ragged_dot(shrink, B.astype(jnp.float32), sizes,
                         preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)
  s = jnp.where(key[order] < n, scale[sid].astype(jnp.float32), 0.0)
  y = y * s[:, None]
  out = jnp.zeros_like(y).at[order].set(y)
  return out.astype(x.dtype)


# -- pallas -------------------------------------------------------------------


def _kernel(tile_adapter_ref, x_ref, a_ref, b_ref, scale_ref, rank_ref, y_ref,
            *, block_k, block_o, num_k, num_o):
  i = pl.program_id(0)
  raw = tile_adapter_ref[i]

  @pl.when(raw < 0)
  def _skip():
    y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)

  @pl.when(raw >= 0)
  def _run():
    a = raw
    bt = x_ref.shape[0]
    r = a_ref.shape[-1]

    def shrink_step(k, acc):
      xk = x_ref[:, pl.ds(k * block_k, block_k)]
      ak = a_ref[a, pl.ds(k * block_k, block_k), :]
      return acc + jnp.dot(xk, ak, preferred_element_type=jnp.float32,
                           precision=_precision(xk.dtype))

    acc = jax.lax.fori_loop(0, num_k, shrink_step,
                            jnp.zeros((bt, r), jnp.float32))
    cols = jax.lax.broadcasted_iota(jnp.int32, (bt, r), 1)
    shrink = jnp.where(cols < rank_ref[a], acc, 0.0) * scale_ref[a]
    shrink = shrink.astype(b_ref.dtype)

    def expand_step(o, carry):
      bo = b_ref[a, :, pl.ds(o * block_o, block_o)]
      yo = jnp.dot(shrink, bo, preferred_element_type=jnp.float32,
                   precision=_precision(bo.dtype))
      y_ref[:, pl.ds(o * block_o, block_o)] = yo.astype(y_ref.dtype)
      return carry

    jax.lax.fori_loop(0, num_o, expand_step, 0)


def _precision(dtype):
  # f32 inputs: full precision (GPUs would otherwise round through TF32)
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


# the Triton backend, named (jax 0.10 lowers a pallas_call without
# parameters through Mosaic GPU, which wants 128-aligned copies)
_TRITON = plt.CompilerParams(num_warps=4, num_stages=2)


def _bgmv_kernel(ids_ref, x_ref, a_ref, b_ref, scale_ref, rank_ref, y_ref, *,
                 block_k, block_o, h_in, h_out, r):
  """One token: its adapter's shrink ``v = x A`` kept in registers, then
  the expand ``v B`` chunk by chunk, in one program. Every load and store
  is a masked power-of-two tile, so any ``H_in``, ``H_out`` and ``r`` work
  without padding (copying) the adapters; a token without an adapter
  (id -1) only writes zeros."""
  t = pl.program_id(0)
  a = ids_ref[t]
  r_pad = _pow2(r)
  rank_cols = jnp.arange(r_pad) < r

  @pl.when(a < 0)
  def _skip():
    def zero(o, carry):
      cols = o * block_o + jnp.arange(block_o)
      plt.store(y_ref.at[t, pl.ds(o * block_o, block_o)],
                jnp.zeros((block_o,), y_ref.dtype), mask=cols < h_out)
      return carry

    jax.lax.fori_loop(0, pl.cdiv(h_out, block_o), zero, 0)

  @pl.when(a >= 0)
  def _run():
    def shrink(k, acc):
      rows = k * block_k + jnp.arange(block_k)
      inside = rows < h_in
      xk = plt.load(x_ref.at[t, pl.ds(k * block_k, block_k)], mask=inside,
                    other=0).astype(jnp.float32)
      ak = plt.load(a_ref.at[a, pl.ds(k * block_k, block_k), pl.ds(0, r_pad)],
                    mask=inside[:, None] & rank_cols[None, :],
                    other=0).astype(jnp.float32)
      return acc + jnp.sum(xk[:, None] * ak, axis=0)

    v = jax.lax.fori_loop(0, pl.cdiv(h_in, block_k), shrink,
                          jnp.zeros((r_pad,), jnp.float32))
    live = jnp.arange(r_pad) < rank_ref[a]
    v = jnp.where(live, v, 0.0) * scale_ref[a]

    def expand(o, carry):
      cols = o * block_o + jnp.arange(block_o)
      inside = cols < h_out
      bo = plt.load(b_ref.at[a, pl.ds(0, r_pad), pl.ds(o * block_o, block_o)],
                    mask=rank_cols[:, None] & inside[None, :],
                    other=0).astype(jnp.float32)
      plt.store(y_ref.at[t, pl.ds(o * block_o, block_o)],
                jnp.sum(v[:, None] * bo, axis=0).astype(y_ref.dtype),
                mask=inside)
      return carry

    jax.lax.fori_loop(0, pl.cdiv(h_out, block_o), expand, 0)


def _pallas_bgmv(x, A, B, scale, ranks, ids, blocks: LoRABlockSizes,
                 interpret: bool):
  """Per-token fused kernel (decode): one program per token does the
  shrink and the expand, with no sorting or tiling of tokens and no copy
  of the adapters. Each token reads its adapter's A and B once:
  memory-bound, as the operator is at decode batch sizes."""
  t, h_in = x.shape
  n, _, r = A.shape
  h_out = B.shape[-1]
  if ranks is None:
    ranks = jnp.full((n,), r, jnp.int32)
  r_pad = _pow2(r)
  # register tiles of at most 8192 elements of A (or B) per step
  bk = min(_pow2(blocks.block_k * 4), _pow2(h_in), max(1, 8192 // r_pad))
  bo = min(_pow2(blocks.block_o * 4), _pow2(h_out), max(1, 8192 // r_pad))
  full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
  ids = ids.astype(jnp.int32)
  scale = scale.astype(jnp.float32)
  ranks = jnp.asarray(ranks, jnp.int32)
  return pl.pallas_call(
      functools.partial(_bgmv_kernel, block_k=bk, block_o=bo, h_in=h_in,
                        h_out=h_out, r=r),
      out_shape=jax.ShapeDtypeStruct((t, h_out), x.dtype),
      grid=(t,),
      in_specs=[full(ids.shape), full(x.shape), full(A.shape), full(B.shape),
                full(scale.shape), full(ranks.shape)],
      out_specs=full((t, h_out)),
      interpret=interpret,
      compiler_params=_TRITON,
  )(ids, x, A, B, scale, ranks)


def _tiles(group_sizes, group_adapter, num_tokens, block_t):
  """Tiles of ``block_t`` token slots, each within one group."""
  g = group_sizes.shape[0]
  max_tiles = pl.cdiv(num_tokens, block_t) + min(g, num_tokens)
  per_group = (group_sizes + block_t - 1) // block_t
  tile_end = jnp.cumsum(per_group)
  tile_start = tile_end - per_group
  tok_start = jnp.cumsum(group_sizes) - group_sizes
  tile = jnp.arange(max_tiles)
  grp = jnp.searchsorted(tile_end, tile, side="right", method="compare_all")
  used = grp < g
  grp = jnp.minimum(grp, g - 1)
  row0 = tok_start[grp] + (tile - tile_start[grp]) * block_t
  rows = row0[:, None] + jnp.arange(block_t)[None, :]
  valid = used[:, None] & (rows < (tok_start + group_sizes)[grp][:, None])
  adapter = jnp.where(used, group_adapter[grp], -1).astype(jnp.int32)
  return rows, valid, adapter


def _pad_to(x, axis, multiple):
  size = x.shape[axis]
  pad = (-size) % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _pallas_grouped(x, A, B, scale, ranks, group_sizes, group_adapter, order,
                    blocks: LoRABlockSizes, interpret: bool):
  t, h_in = x.shape
  n, _, r = A.shape
  h_out = B.shape[-1]
  if ranks is None:
    ranks = jnp.full((n,), r, jnp.int32)
  r_pad = max(blocks.min_rank, 1 << (r - 1).bit_length())
  bk = min(blocks.block_k, 1 << (h_in - 1).bit_length())
  bo = min(blocks.block_o, 1 << (h_out - 1).bit_length())
  A = _pad_to(_pad_to(A, 2, r_pad), 1, bk)
  B = _pad_to(_pad_to(B, 1, r_pad), 2, bo)
  xo = x if order is None else x[order]
  xo = _pad_to(xo, 1, bk)
  rows, valid, tile_adapter = _tiles(group_sizes, group_adapter, t,
                                     blocks.block_t)
  num_tiles = rows.shape[0]
  x_tiles = jnp.where(valid[..., None], xo[jnp.clip(rows, 0, t - 1)], 0)
  x_tiles = x_tiles.reshape(num_tiles * blocks.block_t, A.shape[1])
  hi, ho = A.shape[1], B.shape[2]
  kernel = functools.partial(_kernel, block_k=bk, block_o=bo, num_k=hi // bk,
                             num_o=ho // bo)
  full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
  y_tiles = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_tiles * blocks.block_t, ho), x.dtype),
      grid=(num_tiles,),
      in_specs=[full(tile_adapter.shape),
                pl.BlockSpec((blocks.block_t, hi), lambda i: (i, 0)),
                full(A.shape), full(B.shape), full((n,)), full((n,))],
      out_specs=pl.BlockSpec((blocks.block_t, ho), lambda i: (i, 0)),
      interpret=interpret,
      compiler_params=_TRITON,
  )(tile_adapter, x_tiles, A, B, scale.astype(jnp.float32),
    jnp.asarray(ranks, jnp.int32))
  dest = jnp.where(valid, rows, t).reshape(-1)
  y = jnp.zeros((t, ho), x.dtype).at[dest].set(y_tiles, mode="drop")
  if order is not None:
    y = jnp.zeros_like(y).at[order].set(y)
  return y[:, :h_out]


def _bgmv_groups(ids, n):
  valid = ids >= 0
  key = jnp.where(valid, ids, -1) + 1  # group 0: no adapter
  order = jnp.argsort(key, stable=True)
  sizes = jnp.bincount(key, length=n + 1).astype(jnp.int32)
  return sizes, jnp.arange(-1, n, dtype=jnp.int32), order


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _lora_pallas(x, A, B, scale, ranks_f, ids, seg_starts, seg_ids, layout,
                 blocks, interpret):
  ranks = None if ranks_f is None else ranks_f.astype(jnp.int32)
  if layout == "bgmv":
    return _pallas_bgmv(x, A, B, scale, ranks, ids, blocks, interpret)
  else:
    sizes = jnp.diff(seg_starts)
    adapters, order = seg_ids, None
  return _pallas_grouped(x, A, B, scale, ranks, sizes, adapters, order, blocks,
                         interpret)


def _lora_pallas_fwd(x, A, B, scale, ranks_f, ids, seg_starts, seg_ids, layout,
                     blocks, interpret):
  y = _lora_pallas(x, A, B, scale, ranks_f, ids, seg_starts, seg_ids, layout,
                   blocks, interpret)
  return y, (x, A, B, scale, ranks_f, ids)


def _lora_pallas_bwd(layout, blocks, interpret, res, dy):
  x, A, B, scale, ranks_f, ids = res
  ranks = None if ranks_f is None else ranks_f.astype(jnp.int32)
  _, vjp = jax.vjp(lambda x_, a_, b_, s_: _ragged(x_, a_, b_, ids, s_, ranks),
                   x, A, B, scale)
  dx, dA, dB, ds = vjp(dy)
  dranks = None if ranks_f is None else jnp.zeros_like(ranks_f)
  return dx, dA, dB, ds, dranks, None, None, None


_lora_pallas.defvjp(_lora_pallas_fwd, _lora_pallas_bwd)


def _check(x, A, B, scale):
  if x.ndim != 2 or A.ndim != 3 or B.ndim != 3:
    raise ValueError(f"expected x[T, H_in], A[N, H_in, r], B[N, r, H_out]; got "
                     f"x{tuple(x.shape)}, A{tuple(A.shape)}, B{tuple(B.shape)}")
  if A.shape[1] != x.shape[1] or B.shape[1] != A.shape[2] or \
      B.shape[0] != A.shape[0]:
    raise ValueError(f"shapes do not chain: x{tuple(x.shape)} @ "
                     f"A{tuple(A.shape)} @ B{tuple(B.shape)}")
  if scale.shape != (A.shape[0],):
    raise ValueError(f"scale has shape {tuple(scale.shape)}; expected "
                     f"({A.shape[0]},), one per adapter")


def _select_layer(A, B, layer):
  if layer is None:
    return A, B
  return A[layer], B[layer]


def bgmv(x, A, B, adapter_ids, scale, *, ranks=None, backend: str = "auto",
         layer=None, block_sizes: LoRABlockSizes = LoRABlockSizes(),
         interpret: bool | None = None):
  """LoRA update for tokens with one adapter id each.

  Args:
    x: ``[T, H_in]`` tokens.
    A: ``[N, H_in, r]`` (or ``[L, N, H_in, r]`` with ``layer``).
    B: ``[N, r, H_out]`` (or ``[L, N, r, H_out]``).
    adapter_ids: ``[T]`` int, -1 for tokens without an adapter.
    scale: ``[N]`` per-adapter scale.
    ranks: optional ``[N]`` true ranks (<= r) of adapters padded to r.
    backend: "auto", "pallas", "ragged_dot" or "reference".
    layer: index into a leading layer dim of ``A``/``B``.
    block_sizes: Pallas tile sizes.
    interpret: run the Pallas kernel in interpret mode (default: off GPU).

  Returns:
    ``[T, H_out]`` update, dtype of ``x``.
  """
  A, B = _select_layer(A, B, layer)
  scale = jnp.asarray(scale)
  _check(x, A, B, scale)
  ids = jnp.asarray(adapter_ids, jnp.int32)
  if ids.shape != (x.shape[0],):
    raise ValueError(f"adapter_ids has shape {tuple(ids.shape)}; expected "
                     f"({x.shape[0]},), one per token")
  none = jnp.zeros((1,), jnp.int32)
  return _run(x, A, B, ids, scale, ranks, backend, none, none, "bgmv",
              block_sizes, interpret)


def sgmv(x, A, B, seg_starts, seg_adapter_ids, scale, *, ranks=None,
         backend: str = "auto", layer=None,
         block_sizes: LoRABlockSizes = LoRABlockSizes(),
         interpret: bool | None = None):
  """LoRA update for contiguous segments of tokens, one adapter per segment.

  Args:
    x: ``[T, H_in]`` tokens.
    A, B, scale, ranks, backend, layer, block_sizes, interpret: as ``bgmv``.
    seg_starts: ``[S + 1]`` segment boundaries, first 0, last T.
    seg_adapter_ids: ``[S]`` adapter of each segment (-1: none).

  Returns:
    ``[T, H_out]`` update, dtype of ``x``.
  """
  A, B = _select_layer(A, B, layer)
  scale = jnp.asarray(scale)
  _check(x, A, B, scale)
  seg_starts = jnp.asarray(seg_starts, jnp.int32)
  seg_ids = jnp.asarray(seg_adapter_ids, jnp.int32)
  if seg_starts.shape != (seg_ids.shape[0] + 1,):
    raise ValueError(f"seg_starts has {seg_starts.shape[0]} entries for "
                     f"{seg_ids.shape[0]} segments; expected S + 1")
  ids = segments_to_ids(seg_starts, seg_ids, x.shape[0])
  return _run(x, A, B, ids, scale, ranks, backend, seg_starts, seg_ids, "sgmv",
              block_sizes, interpret)


def _run(x, A, B, ids, scale, ranks, backend, seg_starts, seg_ids, layout,
         block_sizes, interpret):
  """Dispatches to a backend (both layouts reduce to per-token ids except
  in the Pallas kernels)."""
  kind = _backend.resolve(backend, BACKENDS)
  if backend == "auto":
    kind = tuning.choose(f"lora_{layout}", x.dtype,
                         dict(tokens=x.shape[0], rank=A.shape[-1],
                              h_in=A.shape[1], h_out=B.shape[-1]),
                         default=kind)
  if kind == "reference":
    return bgmv_reference(x, A, B, ids, scale, ranks=ranks)
  if kind == "ragged_dot":
    return _ragged(x, A, B, ids, scale, ranks)
  interp = _backend.default_interpret() if interpret is None else interpret
  ranks_f = None if ranks is None else jnp.asarray(ranks, jnp.float32)
  return _lora_pallas(x, A, B, scale, ranks_f, ids, seg_starts, seg_ids,
                      layout, block_sizes, interp)
