"""Per-primitive strategy rules: each maps an op to its ``LoopNest``.

Adding a primitive means adding one rule, here or in ``rules_indexing`` (ops
that keep some dims whole): its ``register`` call names the primitive, its
loop nest, and whether the intra-op pass folds it into an operand's ILP node
(``Follow``). A primitive without a rule gets ``default_rule``: every operand
and output replicated, and one warning naming it (see
``registry.strategies_for``).
"""

from __future__ import annotations

from alpa_py.compiler.strategies.loop_nest import LoopNest, replicated_nest
from alpa_py.compiler.strategies.rule_table import Follow, register

ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e "
    "bitcast_convert_type "
    "bessel_i1e cbrt ceil clamp clz conj convert_element_type copy copy_p cos "
    "cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt igamma "
    "igammac imag integer_pow is_finite le lgamma log log1p logistic lt max "
    "min mul ne neg nextafter not one_minus_square or polygamma population_count pow real "
    "reduce_precision rem round rsqrt select_n shift_left "
    "shift_right_arithmetic shift_right_logical sign sin sinh sqrt square "
    "stop_gradient sub tan tanh xor threefry2x32 zeta "
    # one operand each (``graph`` splits a barrier over several values into
    # one per value): an identity that XLA may not look through
    "optimization_barrier").split()

# Deliberately kept whole: control flow we cannot look inside (``while``
# with an unknown trip count, ``cond``; a ``scan`` is planned through its
# body, see ``graph.Region``, and reaches this rule only where it has none),
# PRNG key plumbing (tiny), and
# grouped matmuls / custom kernels whose row groups a split would cut, and
# dense factorizations (cholesky, triangular solves, eigh, ...: the small
# n x n systems of second-order optimizers, where a split buys nothing).
REPLICATED = ("scan while cond ragged_dot_general pallas_call random_bits random_seed random_wrap "
              "random_unwrap random_fold_in random_split rng_bit_generator "
              "rng_uniform custom_lin pure_callback io_callback debug_callback "
              "linear_solve custom_linear_solve cholesky triangular_solve eigh eig lu qr "
              "svd householder_product tridiagonal_solve").split()


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
    elif len(i.shape) == len(shape) and all(
        a in (b, 1) for a, b in zip(i.shape, shape)):
      # an operand broadcast along its size-1 dims follows the others
      in_maps.append(tuple(d if a == b else None
                           for d, (a, b) in enumerate(zip(i.shape, shape))))
    else:
      in_maps.append((None,) * len(i.shape))
  out_maps = tuple(_identity(len(shape)) if o.shape == shape else
                   (None,) * len(o.shape) for o in outs)
  return LoopNest(sizes=shape,
                  shardable=tuple(d not in unshardable for d in range(len(shape))),
                  in_maps=tuple(in_maps), out_maps=out_maps,
                  reduction=reduction)


@register(*ELEMENTWISE, follow=Follow.SAME_SIZE)
def elementwise_rule(op, ins, outs):
  return _same_shape_nest(ins, outs)


@register("iota", "full", "empty", "empty2")
def iota_rule(op, ins, outs):
  return _same_shape_nest(ins, outs)


@register("broadcast_in_dim", follow=Follow.ANY_SIZE, follow_min_shards=True)
def broadcast_rule(op, ins, outs):
  out = outs[0]
  bd = op.params["broadcast_dimensions"]
  m = tuple(d if ins[0].shape[i] == out.shape[d] else None
            for i, d in enumerate(bd))
  in_maps = (m,) + tuple(None for _ in ins[1:])
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=in_maps, out_maps=(_identity(len(out.shape)),))


@register("transpose", follow=Follow.SAME_SIZE)
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


@register("reshape", follow=Follow.SAME_SIZE)
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


@register("squeeze", follow=Follow.SAME_SIZE)
def squeeze_rule(op, ins, outs):
  dims = set(d % max(len(ins[0].shape), 1) for d in op.params["dimensions"])
  kept = [d for d in range(len(ins[0].shape)) if d not in dims]
  in_map = [None] * len(ins[0].shape)
  for j, d in enumerate(kept):
    in_map[d] = j
  out = outs[0]
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=(tuple(in_map),), out_maps=(_identity(len(out.shape)),))


@register("expand_dims", follow=Follow.SAME_SIZE)
def expand_dims_rule(op, ins, outs):
  out = outs[0]
  new = set(op.params["dimensions"])
  kept = [d for d in range(len(out.shape)) if d not in new]
  return LoopNest(sizes=out.shape, shardable=(True,) * len(out.shape),
                  in_maps=(tuple(kept),), out_maps=(_identity(len(out.shape)),))


_REDUCTION_KIND = {"reduce_sum": "sum", "reduce_max": "max",
                   "reduce_min": "max", "reduce_prod": "max",
                   "reduce_and": "max", "reduce_or": "max", "reduce_xor": "max"}


@register("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax",
          "argmin", follow=Follow.ANY_SIZE)
def reduce_rule(op, ins, outs):
  src = ins[0].shape
  axes = set(op.params["axes"])
  kept = [d for d in range(len(src)) if d not in axes]
  kind = _REDUCTION_KIND.get(op.name)  # argmax/argmin: None, not splittable
  return LoopNest(sizes=src, shardable=(True,) * len(src),
                  in_maps=(_identity(len(src)),) + tuple(None for _ in ins[1:]),
                  out_maps=(tuple(kept),), reduction=kind)


# The logical reductions (boolean masks) share the loop nest but keep a node
# of their own: the ILP, not their operand, decides their layout.
register("reduce_and", "reduce_or", "reduce_xor")(reduce_rule)


@register("dot_general", heavy=True)
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


@register("conv_general_dilated", heavy=True)
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
                  tuple(f"s{k}" for k in range(n_sp)), is_matmul=True,
                  is_conv=True)
