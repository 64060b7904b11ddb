"""Strategy enumeration over an op's iteration space.

Most primitives are loop nests in disguise: ``dot_general`` iterates over batch,
left-free, right-free and contracting dims; a reduction over its input dims; an
elementwise op over its output dims. A rule describes an op as a ``LoopNest``:
the size of each loop dim, whether it may be split, and for every operand and
output which loop dim each of its dims follows. Assigning each mesh axis to one
loop dim (or none) then yields one strategy: the specs of all operands and
outputs follow, loop dims missing from the outputs become partial sums (an
all-reduce, or a reduce-scatter onto an output dim), and the work divides by
the number of shards.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

from alpa_py.compiler.cluster_env import LogicalMesh
from alpa_py.compiler.graph import TensorInfo
from alpa_py.compiler.strategies.spec import Spec, num_shards

DimMap = tuple  # tuple[int | None, ...]: per tensor dim, its loop dim


@dataclasses.dataclass(frozen=True)
class LoopNest:
  """An op's iteration space, as seen by the strategy generator.

  Attributes:
    sizes: size of each loop dim.
    shardable: whether each loop dim may be split over a mesh axis.
    in_maps: per operand, a DimMap, or None for operands with no layout
      requirement (literals, scalars).
    out_maps: per output, a DimMap.
    reduction: "sum" or "max" if loop dims absent from every output may be
      split (their partial results are then combined by an all-reduce); None
      forbids splitting them.
    labels: a short name per loop dim, for printing plans.
    is_matmul: whether the op's work is priced as matmul FLOPs (else bytes).
    is_conv: a convolution: its FLOPs priced at the convolution rate.
  """

  sizes: tuple[int, ...]
  shardable: tuple[bool, ...]
  in_maps: tuple
  out_maps: tuple
  reduction: str | None = None
  labels: tuple[str, ...] | None = None
  is_matmul: bool = False
  is_conv: bool = False


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One way to run an op on the mesh."""

  name: str
  out_specs: tuple[Spec, ...]
  in_specs: tuple  # Spec or None (no requirement) per operand
  compute_cost: float
  comm_cost: float

  @property
  def cost(self) -> float:
    return self.compute_cost + self.comm_cost


def replicated_nest(in_infos: Sequence[TensorInfo | None],
                    out_infos: Sequence[TensorInfo]) -> LoopNest:
  """A nest whose only strategy keeps every operand and output whole."""
  return LoopNest(
      sizes=(), shardable=(),
      in_maps=tuple(None if i is None else (None,) * len(i.shape)
                    for i in in_infos),
      out_maps=tuple((None,) * len(o.shape) for o in out_infos))


def _spec_for(dim_map: DimMap, loop_axes: dict[int, tuple[int, ...]]) -> Spec:
  return tuple(loop_axes.get(d, ()) if d is not None else () for d in dim_map)


def _divisible(spec: Spec, shape: tuple[int, ...],
               mesh_shape: tuple[int, ...]) -> bool:
  for size, axes in zip(shape, spec):
    if axes and size % math.prod(mesh_shape[a] for a in axes):
      return False
  return True


def enumerate_strategies(nest: LoopNest, in_infos: Sequence[TensorInfo | None],
                         out_infos: Sequence[TensorInfo], flops: float,
                         nbytes: float, mesh: LogicalMesh, *,
                         allow_reduce_scatter: bool = True,
                         prefer_reduce_scatter: bool = False,
                         allow_mixed_mesh_shape: bool = False
                         ) -> list[Strategy]:
  """All strategies of a loop nest on a mesh (replicated first).

  Args:
    nest: the op's loop nest.
    in_infos: operand shapes (None for literals).
    out_infos: output shapes.
    flops: the op's floating-point work.
    nbytes: bytes the op reads and writes.
    mesh: the logical mesh with its cost model.
    allow_reduce_scatter: also offer reduce-scatter for partial sums.
    prefer_reduce_scatter: drop all-reduce variants where a reduce-scatter
      variant exists (ZeRO-style sharded gradients).
    allow_mixed_mesh_shape: also split a dim over both axes in the order
      (1, 0), not only (0, 1).

  Returns:
    The strategies, deduplicated by their specs (the cheapest kept).
  """
  axes = [a for a, s in enumerate(mesh.shape) if s > 1]
  choices = [None] + [d for d, ok in enumerate(nest.shardable) if ok]
  out_dims = {d for m in nest.out_maps for d in m if d is not None}
  labels = nest.labels or tuple(f"l{d}" for d in range(len(nest.sizes)))
  base_compute = mesh.compute(flops, nbytes, nest.is_matmul, nest.is_conv)
  found: dict[tuple, Strategy] = {}

  def add(strategy: Strategy):
    key = (strategy.out_specs, strategy.in_specs)
    old = found.get(key)
    if old is None or strategy.cost < old.cost:
      found[key] = strategy

  for combo in itertools.product(choices, repeat=len(axes)):
    loop_axes: dict[int, tuple[int, ...]] = {}
    for axis, d in zip(axes, combo):
      if d is not None:
        loop_axes[d] = loop_axes.get(d, ()) + (axis,)
    orders = [loop_axes]
    if allow_mixed_mesh_shape:
      for d, ax in loop_axes.items():
        if len(ax) == 2:
          orders.append({**loop_axes, d: ax[::-1]})
    for la in orders:
      _add_combo(nest, la, in_infos, out_infos, out_dims, labels,
                 base_compute, mesh, allow_reduce_scatter,
                 prefer_reduce_scatter, add)
  strategies = sorted(found.values(), key=lambda s: (
      sum(num_shards(sp, mesh.shape) for sp in s.out_specs), s.name))
  return strategies


def _add_combo(nest, loop_axes, in_infos, out_infos, out_dims, labels,
               base_compute, mesh, allow_rs, prefer_rs, add):
  mshape = mesh.shape
  for d, ax in loop_axes.items():
    if nest.sizes[d] % math.prod(mshape[a] for a in ax):
      return
  in_specs = []
  for info, m in zip(in_infos, nest.in_maps):
    if m is None or info is None:
      in_specs.append(None)
      continue
    spec = _spec_for(m, loop_axes)
    if not _divisible(spec, info.shape, mshape):
      return
    in_specs.append(spec)
  out_specs = []
  for info, m in zip(out_infos, nest.out_maps):
    spec = _spec_for(m, loop_axes)
    if not _divisible(spec, info.shape, mshape):
      return
    out_specs.append(spec)
  red_axes = [a for d, ax in loop_axes.items() if d not in out_dims for a in ax]
  if red_axes and nest.reduction is None:
    return
  shards = math.prod(mshape[a] for ax in loop_axes.values() for a in ax)
  compute = base_compute / shards
  name = ",".join(f"{labels[d]}:S{''.join(map(str, ax))}"
                  for d, ax in sorted(loop_axes.items())) or "replicated"
  out_bytes = sum(o.nbytes / num_shards(s, mshape)
                  for o, s in zip(out_infos, out_specs))
  ar_cost = sum(mesh.all_reduce(out_bytes, a) for a in red_axes)
  rs_added = False
  if red_axes and allow_rs and nest.reduction == "sum" and len(out_infos) == 1:
    for spec, rs_axes, cost in _reduce_scatter_variants(
        out_specs[0], out_infos[0], red_axes, mesh):
      # the partial sums over the other reduced axes are all-reduced, after
      # the scatter (on the smaller result)
      suffix = "+RS" + "".join(map(str, rs_axes))
      ar_axes = [a for a in red_axes if a not in rs_axes]
      if ar_axes:
        suffix += "+AR" + "".join(map(str, ar_axes))
      else:
        rs_added = True
      add(Strategy(name + suffix, (spec,), tuple(in_specs), compute, cost))
  if red_axes and prefer_rs and rs_added:
    return
  suffix = "+AR" if red_axes else ""
  add(Strategy(name + suffix, tuple(out_specs), tuple(in_specs), compute,
               ar_cost))


def _reduce_scatter_variants(spec: Spec, info: TensorInfo, red_axes,
                             mesh: LogicalMesh):
  """Moves partial-sum axes onto output dims: reduce-scatter, not all-reduce.

  Yields (spec, scattered axes, cost) for every non-empty subset of the
  reduced axes scattered (each onto every output dim it divides); the
  remaining reduced axes are all-reduced on the scattered result. Mixing the
  two lets a gradient be reduce-scattered inside a node and all-reduced
  across nodes, on 1/k of the bytes.
  """
  out_bytes = info.nbytes / num_shards(tuple(spec), mesh.shape)
  used = {a for d in spec for a in d}
  red = [a for a in red_axes if a not in used]
  if len(red) != len(red_axes):
    return
  for k in range(1, len(red) + 1):
    for rs_axes in itertools.combinations(red, k):
      for dims in itertools.product(range(len(info.shape)), repeat=k):
        new = list(spec)
        nbytes = out_bytes
        cost = 0.0
        ok = True
        for a, d in zip(rs_axes, dims):
          split = math.prod(mesh.shape[x] for x in new[d]) * mesh.shape[a]
          if info.shape[d] % split:
            ok = False
            break
          cost += mesh.reduce_scatter(nbytes, a)
          nbytes /= mesh.shape[a]
          new[d] = new[d] + (a,)
        if not ok:
          continue
        cost += sum(mesh.all_reduce(nbytes, a) for a in red
                    if a not in rs_axes)
        yield tuple(new), rs_axes, cost
