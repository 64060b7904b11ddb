"""Rules for ops that keep some dims whole.

Slicing, padding, concatenation, scans, sorts, windows, split, gather and
scatter each work along some dims (cut, shift, combine or index them); those
dims are left unshardable, since a split there would need data held by other
devices.
"""

from __future__ import annotations

from alpa_py.compiler.strategies.loop_nest import LoopNest
from alpa_py.compiler.strategies.rule_table import Follow, register


def _partial_identity_nest(ins, outs, fixed_dims: set[int],
                           operand_maps=None) -> LoopNest:
  """Loop dims = output dims; ``fixed_dims`` may not be split."""
  out = outs[0]
  r = len(out.shape)
  if operand_maps is None:
    operand_maps = [tuple(d if d not in fixed_dims else None for d in range(r))
                    if i is not None and len(i.shape) == r else None
                    for i in ins]
  return LoopNest(sizes=out.shape,
                  shardable=tuple(d not in fixed_dims for d in range(r)),
                  in_maps=tuple(operand_maps),
                  out_maps=tuple(tuple(range(r)) if o.shape == out.shape
                                 else (None,) * len(o.shape) for o in outs))


@register("concatenate")
def concatenate_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, {op.params["dimension"]})


@register("pad", follow=Follow.SAME_SIZE)
def pad_rule(op, ins, outs):
  fixed = {d for d, (lo, hi, it) in enumerate(op.params["padding_config"])
           if lo or hi or it}
  return _partial_identity_nest(ins, outs, fixed)


@register("slice", follow=Follow.SAME_SIZE)
def slice_rule(op, ins, outs):
  src = ins[0].shape
  strides = op.params.get("strides") or (1,) * len(src)
  fixed = {d for d in range(len(src))
           if op.params["start_indices"][d] != 0 or
           op.params["limit_indices"][d] != src[d] or strides[d] != 1}
  return _partial_identity_nest(ins, outs, fixed)


@register("rev", follow=Follow.SAME_SIZE)
def rev_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, set(op.params["dimensions"]))


@register("dynamic_slice", follow=Follow.SAME_SIZE)
def dynamic_slice_rule(op, ins, outs):
  src = ins[0].shape
  fixed = {d for d, s in enumerate(op.params["slice_sizes"]) if s != src[d]}
  return _partial_identity_nest(ins, outs, fixed)


@register("dynamic_update_slice")
def dynamic_update_slice_rule(op, ins, outs):
  src, upd = ins[0].shape, ins[1].shape
  fixed = {d for d in range(len(src)) if upd[d] != src[d]}
  ident = tuple(d if d not in fixed else None for d in range(len(src)))
  maps = [ident, ident] + [None] * (len(ins) - 2)
  return _partial_identity_nest(ins, outs, fixed, maps)


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
          follow=Follow.SAME_SIZE)
def cumulative_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, {op.params["axis"]})


@register("sort")
def sort_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, {op.params["dimension"]})


@register("top_k")
def top_k_rule(op, ins, outs):
  r = len(ins[0].shape)
  return _partial_identity_nest(ins, outs, {r - 1})


@register("stack")
def stack_rule(op, ins, outs):
  """``jnp.stack``: the operands' dims map around the new dim, which stays
  whole (each operand is one slice of it)."""
  axis = op.params["axis"]
  out = outs[0].shape
  r = len(out)
  in_map = tuple(d if d < axis else d + 1 for d in range(r - 1))
  return LoopNest(sizes=out, shardable=tuple(d != axis for d in range(r)),
                  in_maps=tuple(in_map if i is not None else None for i in ins),
                  out_maps=(tuple(range(r)),))


@register("unstack")
def unstack_rule(op, ins, outs):
  """``jnp.unstack``: every result is one slice of the unstacked dim."""
  axis = op.params["axis"]
  src = ins[0].shape
  r = len(src)
  return LoopNest(sizes=src, shardable=tuple(d != axis for d in range(r)),
                  in_maps=(tuple(range(r)),),
                  out_maps=tuple(tuple(d for d in range(r) if d != axis)
                                 for _ in outs))


@register("split")
def split_rule(op, ins, outs):
  axis = op.params["axis"]
  src = ins[0].shape
  r = len(src)
  return LoopNest(sizes=src, shardable=tuple(d != axis for d in range(r)),
                  in_maps=(tuple(d if d != axis else None for d in range(r)),),
                  out_maps=tuple(tuple(d if d != axis else None for d in range(r))
                                 for _ in outs))


def _window_fixed(op, rank: int) -> set[int]:
  p = op.params
  fixed = set()
  for d in range(rank):
    win = p["window_dimensions"][d]
    stride = p["window_strides"][d]
    pad = p["padding"][d] if "padding" in p else (0, 0)
    dil = [x[d] for x in (p.get("base_dilation"), p.get("window_dilation"))
           if x is not None]
    if win != 1 or stride != 1 or tuple(pad) != (0, 0) or any(v != 1 for v in dil):
      fixed.add(d)
  return fixed


@register("reduce_window_sum", "reduce_window_max", "reduce_window_min")
def reduce_window_rule(op, ins, outs):
  fixed = _window_fixed(op, len(ins[0].shape))
  return _partial_identity_nest(ins, outs, fixed)


@register("select_and_scatter_add", "select_and_gather_add")
def select_and_scatter_rule(op, ins, outs):
  fixed = _window_fixed(op, len(outs[0].shape))
  return _partial_identity_nest(ins, outs, fixed)


@register("gather")
def gather_rule(op, ins, outs):
  """Output batch dims follow the indices; full-slice dims follow the operand."""
  dn = op.params["dimension_numbers"]
  slice_sizes = op.params["slice_sizes"]
  operand, indices, out = ins[0].shape, ins[1].shape, outs[0].shape
  offset_dims = tuple(dn.offset_dims)
  collapsed = set(dn.collapsed_slice_dims)
  op_batching = tuple(getattr(dn, "operand_batching_dims", ()) or ())
  idx_batching = tuple(getattr(dn, "start_indices_batching_dims", ()) or ())
  start_map = set(dn.start_index_map)
  r = len(out)
  batch_out = [d for d in range(r) if d not in offset_dims]
  idx_dims = list(range(len(indices) - 1))  # index_vector_dim is last
  imap = [None] * len(indices)
  for k, d in zip(idx_dims, batch_out):
    imap[k] = d
  omap = [None] * len(operand)
  window = [d for d in range(len(operand))
            if d not in collapsed and d not in op_batching]
  for d, od in zip(window, offset_dims):
    if slice_sizes[d] == operand[d] and d not in start_map:
      omap[d] = od
  for od, idd in zip(op_batching, idx_batching):
    omap[od] = imap[idd]
  shardable = tuple(True for _ in range(r))
  return LoopNest(sizes=out, shardable=shardable,
                  in_maps=(tuple(omap), tuple(imap)),
                  out_maps=(tuple(range(r)),))


@register("scatter-add", "scatter_add", "scatter", "scatter_mul", "scatter_min",
          "scatter_max")
def scatter_rule(op, ins, outs):
  """Loop dims: operand dims, then the updates' scatter dims (summed over)."""
  dn = op.params["dimension_numbers"]
  operand, indices, updates = ins[0].shape, ins[1].shape, ins[2].shape
  window_dims = tuple(dn.update_window_dims)
  inserted = set(dn.inserted_window_dims)
  op_batching = tuple(getattr(dn, "operand_batching_dims", ()) or ())
  to_operand = set(dn.scatter_dims_to_operand_dims)
  r = len(operand)
  scatter_dims = [d for d in range(len(updates)) if d not in window_dims]
  sizes = list(operand) + [updates[d] for d in scatter_dims]
  shardable = [True] * r + [True] * len(scatter_dims)
  umap = [None] * len(updates)
  omap = list(range(r))
  window_operand = [d for d in range(r) if d not in inserted and d not in op_batching]
  for od, ud in zip(window_operand, window_dims):
    if updates[ud] == operand[od] and od not in to_operand:
      umap[ud] = od
    else:
      shardable[od] = False
  for d in inserted | set(to_operand):
    if d < r:
      shardable[d] = False
  imap = [None] * len(indices)
  for k, ud in enumerate(scatter_dims):
    umap[ud] = r + k
    if k < len(indices) - 1:
      imap[k] = r + k
  # A batching dim pairs an indices dim with an operand dim: update row i
  # lands in operand row i, so the two share one loop, which is no sum
  # (take_along_axis's gradient scatters each example into its own row).
  idx_batching = tuple(getattr(dn, "scatter_indices_batching_dims", ()) or ())
  paired = set()
  for ob, ib in zip(op_batching, idx_batching):
    if ib < len(scatter_dims) and ib < len(indices) - 1:
      umap[scatter_dims[ib]] = ob
      imap[ib] = ob
      paired.add(r + ib)
  additive = op.name in ("scatter-add", "scatter_add")
  for k in range(len(scatter_dims)):
    if not additive or r + k in paired:
      shardable[r + k] = False
  return LoopNest(sizes=tuple(sizes), shardable=tuple(shardable),
                  in_maps=(tuple(omap), tuple(imap), tuple(umap)),
                  out_maps=(tuple(range(r)),),
                  reduction="sum" if additive else None)
