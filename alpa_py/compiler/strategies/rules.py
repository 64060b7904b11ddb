"""Per-primitive strategy rules: each maps an op to its ``LoopNest``.

Adding a primitive means adding one rule here. A primitive without a rule gets
``default_rule``: every operand and output replicated, and one warning naming
it (see ``registry.strategies_for``).
"""

from __future__ import annotations

from typing import Callable, Sequence

from alpa_py.compiler.graph import Op, TensorInfo
from alpa_py.compiler.strategies.loop_nest import LoopNest, replicated_nest

Rule = Callable[[Op, Sequence[TensorInfo | None], Sequence[TensorInfo]],
                LoopNest]
RULES: dict[str, Rule] = {}

ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e "
    "bitcast_convert_type "
    "bessel_i1e cbrt ceil clamp clz conj convert_element_type copy copy_p cos "
    "cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma "
    "igammac imag integer_pow is_finite le lgamma log log1p logistic lt max "
    "min mul ne neg nextafter not one_minus_square or polygamma population_count pow real "
    "reduce_precision rem round rsqrt select_n shift_left "
    "shift_right_arithmetic shift_right_logical sign sin sinh sqrt square "
    "stop_gradient sub tan tanh xor threefry2x32 zeta").split()

# Deliberately kept whole: control flow (the body runs with one layout on
# every iteration, and we do not look inside), PRNG key plumbing (tiny), and
# grouped matmuls / custom kernels whose row groups a split would cut, and
# dense factorizations (cholesky, triangular solves, eigh, ...: the small
# n x n systems of second-order optimizers, where a split buys nothing).
REPLICATED = ("scan while cond ragged_dot_general pallas_call random_bits random_seed random_wrap "
              "random_unwrap random_fold_in random_split rng_bit_generator "
              "rng_uniform custom_lin pure_callback io_callback debug_callback "
              "linear_solve custom_linear_solve cholesky triangular_solve eigh eig lu qr "
              "svd householder_product tridiagonal_solve").split()


def register(*names: str):
  """Decorator: registers a rule for the named primitives."""

  def wrap(fn: Rule) -> Rule:
    for n in names:
      RULES[n] = fn
    return fn

  return wrap


def default_rule(op, ins, outs) -> LoopNest:
  return replicated_nest(ins, outs)


register(*REPLICATED)(default_rule)


def _identity(rank: int) -> tuple[int, ...]:
  return tuple(range(rank))


def _same_shape_nest(ins, outs, unshardable=(), reduction=None) -> LoopNest:
  """Loop dims = output dims; operands of the output's shape follow them."""
  shape = outs[0].shape
  in_maps = []
  for i in ins:
    if i is None or not i.shape:
      in_maps.append(None)
    elif i.shape == shape:
      in_maps.append(_identity(len(shape)))
    else:
      in_maps.append((None,) * len(i.shape))
  out_maps = tuple(_identity(len(shape)) if o.shape == shape else
                   (None,) * len(o.shape) for o in outs)
  return LoopNest(sizes=shape,
                  shardable=tuple(d not in unshardable for d in range(len(shape))),
                  in_maps=tuple(in_maps), out_maps=out_maps,
                  reduction=reduction)


@register(*ELEMENTWISE)
def elementwise_rule(op, ins, outs):
  return _same_shape_nest(ins, outs)


@register("iota", "full", "empty")
def iota_rule(op, ins, outs):
  return _same_shape_nest(ins, outs)


@register("broadcast_in_dim")
def broadcast_rule(op, ins, outs):
  out = outs[0]
  bd = op.params["broadcast_dimensions"]
  m = tuple(d if ins[0].shape[i] == out.shape[d] else None
            for i, d in enumerate(bd))
  in_maps = (m,) + tuple(None for _ in ins[1:])
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=in_maps, out_maps=(_identity(len(out.shape)),))


@register("transpose")
def transpose_rule(op, ins, outs):
  perm = op.params["permutation"]
  in_map = [None] * len(perm)
  for j, p in enumerate(perm):
    in_map[p] = j
  out = outs[0]
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=(tuple(in_map),), out_maps=(_identity(len(out.shape)),))


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]):
  """Pairs minimal runs of dims with equal products: [([src dims], [dst dims])]."""
  groups = []
  i = j = 0
  while i < len(src) or j < len(dst):
    gi, gj = [], []
    pi = pj = 1
    while True:
      if pi == pj and (gi or gj) and (pi != 1 or (i >= len(src) or src[i] != 1)
                                     and (j >= len(dst) or dst[j] != 1)):
        break
      if (pi <= pj and i < len(src)) or j >= len(dst):
        if i >= len(src):
          break
        gi.append(i)
        pi *= src[i]
        i += 1
      else:
        gj.append(j)
        pj *= dst[j]
        j += 1
    groups.append((gi, gj))
  return groups


@register("reshape")
def reshape_rule(op, ins, outs):
  """Splitting a dim keeps a split on its major part; merging, likewise."""
  src, dst = ins[0].shape, outs[0].shape
  in_map = [None] * len(src)
  shardable = [False] * len(dst)
  for gi, gj in reshape_groups(src, dst):
    gi = [d for d in gi if src[d] != 1]
    gj = [d for d in gj if dst[d] != 1]
    if gi and gj:
      in_map[gi[0]] = gj[0]
      shardable[gj[0]] = True
  in_maps = (tuple(in_map),) + tuple(None for _ in ins[1:])
  return LoopNest(sizes=dst, shardable=tuple(shardable), in_maps=in_maps,
                  out_maps=(_identity(len(dst)),))


@register("squeeze")
def squeeze_rule(op, ins, outs):
  dims = set(d % max(len(ins[0].shape), 1) for d in op.params["dimensions"])
  kept = [d for d in range(len(ins[0].shape)) if d not in dims]
  in_map = [None] * len(ins[0].shape)
  for j, d in enumerate(kept):
    in_map[d] = j
  out = outs[0]
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=(tuple(in_map),), out_maps=(_identity(len(out.shape)),))


@register("expand_dims")
def expand_dims_rule(op, ins, outs):
  out = outs[0]
  new = set(op.params["dimensions"])
  kept = [d for d in range(len(out.shape)) if d not in new]
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=(tuple(kept),), out_maps=(_identity(len(out.shape)),))


_REDUCTION_KIND = {"reduce_sum": "sum", "reduce_max": "max",
                   "reduce_min": "max", "reduce_prod": "max",
                   "reduce_and": "max", "reduce_or": "max", "reduce_xor": "max"}


@register(*_REDUCTION_KIND, "argmax", "argmin")
def reduce_rule(op, ins, outs):
  src = ins[0].shape
  axes = set(op.params["axes"])
  kept = [d for d in range(len(src)) if d not in axes]
  kind = _REDUCTION_KIND.get(op.name)  # argmax/argmin: None, not splittable
  return LoopNest(sizes=src, shardable=(True,) * len(src),
                  in_maps=(_identity(len(src)),) + tuple(None for _ in ins[1:]),
                  out_maps=(tuple(kept),), reduction=kind)


@register("dot_general")
def dot_rule(op, ins, outs):
  (lc, rc), (lb, rb) = op.params["dimension_numbers"]
  lhs, rhs = ins[0].shape, ins[1].shape
  lfree = [d for d in range(len(lhs)) if d not in lc and d not in lb]
  rfree = [d for d in range(len(rhs)) if d not in rc and d not in rb]
  # loop dims: batch..., lhs free..., rhs free..., contracting...
  sizes = ([lhs[d] for d in lb] + [lhs[d] for d in lfree] +
           [rhs[d] for d in rfree] + [lhs[d] for d in lc])
  labels = ([f"b{k}" for k in range(len(lb))] + [f"i{k}" for k in range(len(lfree))] +
            [f"j{k}" for k in range(len(rfree))] + [f"k{k}" for k in range(len(lc))])
  nb, nl, nr = len(lb), len(lfree), len(rfree)
  lmap = [None] * len(lhs)
  rmap = [None] * len(rhs)
  for k, (a, b) in enumerate(zip(lb, rb)):
    lmap[a] = k
    rmap[b] = k
  for k, d in enumerate(lfree):
    lmap[d] = nb + k
  for k, d in enumerate(rfree):
    rmap[d] = nb + nl + k
  for k, (a, b) in enumerate(zip(lc, rc)):
    lmap[a] = nb + nl + nr + k
    rmap[b] = nb + nl + nr + k
  out_map = tuple(range(nb + nl + nr))
  return LoopNest(sizes=tuple(sizes), shardable=(True,) * len(sizes),
                  in_maps=(tuple(lmap), tuple(rmap)), out_maps=(out_map,),
                  reduction="sum", labels=tuple(labels), is_matmul=True)


@register("conv_general_dilated")
def conv_rule(op, ins, outs):
  """Split batch, output features or input features; never spatial dims."""
  dn = op.params["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  grouped = (op.params.get("feature_group_count", 1) > 1 or
             op.params.get("batch_group_count", 1) > 1)
  lhs, rhs, out = ins[0].shape, ins[1].shape, outs[0].shape
  # loop dims: 0 = N, 1 = O, 2 = C (contracting), 3.. = output spatial
  n_sp = len(out_spec) - 2
  sizes = [out[out_spec[0]], out[out_spec[1]], rhs[rhs_spec[1]]]
  sizes += [out[d] for d in out_spec[2:]]
  shardable = [op.params.get("batch_group_count", 1) == 1, not grouped,
               not grouped] + [False] * n_sp
  lmap = [None] * len(lhs)
  rmap = [None] * len(rhs)
  omap = [None] * len(out)
  lmap[lhs_spec[0]] = 0
  lmap[lhs_spec[1]] = 2
  rmap[rhs_spec[0]] = 1
  rmap[rhs_spec[1]] = 2
  omap[out_spec[0]] = 0
  omap[out_spec[1]] = 1
  for k, d in enumerate(out_spec[2:]):
    omap[d] = 3 + k
  return LoopNest(sizes=tuple(sizes), shardable=tuple(shardable),
                  in_maps=(tuple(lmap), tuple(rmap)), out_maps=(tuple(omap),),
                  reduction="sum", labels=("n", "o", "c") +
                  tuple(f"s{k}" for k in range(n_sp)), is_matmul=True)


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


@register("pad")
def pad_rule(op, ins, outs):
  fixed = {d for d, (lo, hi, it) in enumerate(op.params["padding_config"])
           if lo or hi or it}
  return _partial_identity_nest(ins, outs, fixed)


@register("slice")
def slice_rule(op, ins, outs):
  src = ins[0].shape
  strides = op.params.get("strides") or (1,) * len(src)
  fixed = {d for d in range(len(src))
           if op.params["start_indices"][d] != 0 or
           op.params["limit_indices"][d] != src[d] or strides[d] != 1}
  return _partial_identity_nest(ins, outs, fixed)


@register("rev")
def rev_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, set(op.params["dimensions"]))


@register("dynamic_slice")
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


@register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")
def cumulative_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, {op.params["axis"]})


@register("sort")
def sort_rule(op, ins, outs):
  return _partial_identity_nest(ins, outs, {op.params["dimension"]})


@register("top_k")
def top_k_rule(op, ins, outs):
  r = len(ins[0].shape)
  return _partial_identity_nest(ins, outs, {r - 1})


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
  additive = op.name in ("scatter-add", "scatter_add")
  if not additive:
    for k in range(len(scatter_dims)):
      shardable[r + k] = False
  return LoopNest(sizes=tuple(sizes), shardable=tuple(shardable),
                  in_maps=(tuple(omap), tuple(imap), tuple(umap)),
                  out_maps=(tuple(range(r)),),
                  reduction="sum" if additive else None)
