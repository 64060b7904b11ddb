"""Sharding specs on a logical mesh, and the cost of moving between them.

A spec has one entry per tensor dimension: the tuple of mesh axes that split
it, major axis first (``()`` means not split). ``((0,), (), (1,))`` splits dim 0
over mesh axis 0 and dim 2 over mesh axis 1; ``((0, 1),)`` splits dim 0 over
the flattened mesh.
"""

from __future__ import annotations

import math

from jax.sharding import PartitionSpec

from alpa_py.compiler.cluster_env import LogicalMesh

Spec = tuple  # tuple[tuple[int, ...], ...]

# Resharding that the options forbid is priced, not removed, so that a plan
# always exists; the price dwarfs any real step time.
FORBIDDEN_PENALTY = 1e3


def replicated(rank: int) -> Spec:
  return ((),) * rank


def num_shards(spec: Spec, mesh_shape: tuple[int, ...]) -> int:
  return int(math.prod(mesh_shape[a] for dim in spec for a in dim))


def to_partition_spec(spec: Spec, axis_names: tuple[str, ...]) -> PartitionSpec:
  """Converts a spec to a ``jax.sharding.PartitionSpec``."""
  entries = []
  for dim in spec:
    if not dim:
      entries.append(None)
    elif len(dim) == 1:
      entries.append(axis_names[dim[0]])
    else:
      entries.append(tuple(axis_names[a] for a in dim))
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def spec_str(spec: Spec) -> str:
  """Alpa-style notation: ``S0R``, ``RS01``, ``RR``."""
  if not spec:
    return "scalar"
  return "".join("R" if not d else "S" + "".join(map(str, d)) for d in spec)


def resharding_kinds(src: Spec, dst: Spec,
                     mesh_shape: tuple[int, ...]) -> frozenset[str]:
  """The collectives that turn ``src`` into ``dst`` (as ``resharding_cost``
  prices them): an axis that stops splitting the tensor is an all-gather,
  one that moves to another dim an all-to-all; starting to split is a local
  slice, no collective."""
  if src == dst or src is None or dst is None:
    return frozenset()
  pos_src = {a: (d, i) for d, axes in enumerate(src) for i, a in enumerate(axes)}
  pos_dst = {a: (d, i) for d, axes in enumerate(dst) for i, a in enumerate(axes)}
  kinds = set()
  for axis, size in enumerate(mesh_shape):
    s, d = pos_src.get(axis), pos_dst.get(axis)
    if size == 1 or s == d or s is None:
      continue
    kinds.add("all-gather" if d is None else "all-to-all")
  return frozenset(kinds)


def resharding_cost(src: Spec, dst: Spec, nbytes: float, mesh: LogicalMesh,
                    allow_all_gather: bool = True,
                    allow_all_to_all: bool = True) -> float:
  """Seconds to turn a tensor laid out as ``src`` into ``dst``.

  Per mesh axis: an axis that stops splitting the tensor costs an all-gather,
  one that moves to another dim costs an all-to-all, one that starts
  splitting it is a local slice (free, plus a small copy).
  """
  if src == dst or src is None or dst is None:
    return 0.0
  pos_src = {a: (d, i) for d, axes in enumerate(src) for i, a in enumerate(axes)}
  pos_dst = {a: (d, i) for d, axes in enumerate(dst) for i, a in enumerate(axes)}
  shards = num_shards(src, mesh.shape)
  cost = 0.0
  for axis, size in enumerate(mesh.shape):
    if size == 1:
      continue
    s, d = pos_src.get(axis), pos_dst.get(axis)
    if s == d:
      continue
    if s is not None and d is None:
      gathered = nbytes / max(shards // size, 1)
      cost += mesh.all_gather(gathered, axis)
      if not allow_all_gather:
        cost += FORBIDDEN_PENALTY
    elif s is not None:
      cost += mesh.all_to_all(nbytes / max(shards // size, 1), axis)
      if not allow_all_to_all:
        cost += FORBIDDEN_PENALTY
    else:
      # a local slice: a copy of the new shard, priced to break ties
      cost += nbytes / shards / size / mesh.profile.mem_bytes_per_s
  return cost
