"""The frozen call signature: what one call of a parallelized step looks like.

``make_signature`` flattens a call's arguments once; the resulting
``Signature`` (tree structures, abstract values, static arguments, the roles
of each argument and the devices) is the executable cache key and the only
record of the call that the compile passes read. The flat leaves are returned
beside it, never stored in it.

A non-array leaf of an array argument (a function, a string, an Equinox
module's activation, a Python bool flag) is static, as under
``equinox.filter_jit``: a ``StaticLeaf`` in the argument's tree structure, so
that a whole Equinox module can be passed. Python ints and floats stay
arrays (as under ``jax.jit``), so that a changing learning rate does not
recompile.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import jax
import numpy as np

from alpa_py.runtime.distributed_array import DistributedArray


@dataclasses.dataclass(frozen=True)
class Aval:
  """Shape, dtype and weak type of one flat input."""

  shape: tuple[int, ...]
  dtype: np.dtype
  weak_type: bool

  def sds(self, shape: tuple[int, ...] | None = None,
          sharding=None) -> jax.ShapeDtypeStruct:
    """A ``ShapeDtypeStruct`` of this aval (optionally another shape)."""
    return jax.ShapeDtypeStruct(self.shape if shape is None else shape,
                                self.dtype, weak_type=self.weak_type,
                                sharding=sharding)


class StaticLeaf:
  """A non-array leaf held static: compared by value where it is hashable,
  else by identity (``equinox.filter_jit``'s rule).

  It is a pytree node without children whose unflattening gives back the
  value: a tree whose non-array leaves are wrapped (``hide_static``)
  flattens to its arrays alone, carries the static values in its tree
  structure, and unflattens to the original tree.
  """

  __slots__ = ("value", "_by_value")

  def __init__(self, value: Any):
    self.value = value
    try:
      hash(value)
      self._by_value = True
    except TypeError:
      self._by_value = False

  def __hash__(self) -> int:
    if self._by_value:
      return hash((type(self.value), self.value))
    return id(self.value)

  def __eq__(self, other) -> bool:
    if not isinstance(other, StaticLeaf):
      return NotImplemented
    if self.value is other.value:
      return True
    if not (self._by_value and other._by_value) or \
        type(self.value) is not type(other.value):
      return False
    try:
      return bool(self.value == other.value)
    except Exception:  # noqa: BLE001 - an __eq__ that cannot answer: unequal
      return False

  def __repr__(self) -> str:
    return f"StaticLeaf({self.value!r:.80})"


jax.tree_util.register_pytree_node(StaticLeaf, lambda s: ((), s),
                                   lambda s, _: s.value)


def hide_static(tree: Any) -> Any:
  """``tree`` with each non-array leaf wrapped in a ``StaticLeaf``."""
  return jax.tree_util.tree_map(
      lambda x: x if is_array_leaf(x) else StaticLeaf(x), tree)


@dataclasses.dataclass(frozen=True)
class Signature:
  """One call's structure; hashable, part of the executable cache key.

  Attributes:
    nargs: positional argument count.
    dyn_argnums: positions of the array arguments.
    treedefs: tree structure of each array argument (its non-array leaves
      in it as ``StaticLeaf`` nodes).
    avals: per flat input, its ``Aval``.
    owners: per flat input, the argument position it comes from.
    paths: per flat input, a readable name (``arg0['params']['w']``).
    static: (position, value) of the static arguments.
    static_leaves: (path, ``StaticLeaf``) of each non-array leaf of the array
      arguments (also held by ``treedefs``; named here for messages).
    donate: donated argument positions.
    batch: batch argument positions.
    devices: the devices the step runs on.
  """

  nargs: int
  dyn_argnums: tuple[int, ...]
  treedefs: tuple[Any, ...]
  avals: tuple[Aval, ...]
  owners: tuple[int, ...]
  paths: tuple[str, ...]
  static: tuple[tuple[int, Any], ...]
  static_leaves: tuple[tuple[str, StaticLeaf], ...]
  donate: tuple[int, ...]
  batch: tuple[int, ...]
  devices: tuple[Any, ...]

  @property
  def batch_inputs(self) -> frozenset[int]:
    """Flat positions of the inputs that come from batch arguments."""
    return frozenset(i for i, o in enumerate(self.owners) if o in self.batch)

  @property
  def donated_inputs(self) -> tuple[int, ...]:
    """Flat positions of the inputs that come from donated arguments."""
    return tuple(i for i, o in enumerate(self.owners) if o in self.donate)

  def rebuild_args(self, leaves: Sequence[Any]) -> list[Any]:
    """Positional arguments from flat leaves (static ones put back)."""
    args: list[Any] = [None] * self.nargs
    for n, val in self.static:
      args[n] = val
    i = 0
    for n, treedef in zip(self.dyn_argnums, self.treedefs):
      k = treedef.num_leaves
      args[n] = jax.tree_util.tree_unflatten(treedef, leaves[i:i + k])
      i += k
    return args


def weak_type(x) -> bool:
  """Whether a flat input is weakly typed (a ``DistributedArray`` never is)."""
  if isinstance(x, DistributedArray):
    return False
  if isinstance(x, jax.ShapeDtypeStruct):
    return bool(x.weak_type)
  return bool(getattr(jax.typeof(x), "weak_type", False))


def is_array_leaf(x) -> bool:
  """Arrays, numeric scalars, remote arrays, and abstract values (which can
  be planned and compiled, not run). A Python ``bool`` is a flag (Equinox's
  ``Dropout.inference``, a ``train`` switch), held static as
  ``equinox.filter_jit`` holds it, so that the step can branch on it."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number,
                        DistributedArray, jax.ShapeDtypeStruct)
                    ) and not isinstance(x, (str, bool))


def as_input(leaf):
  """An array leaf as the step receives it: arrays as they are; NumPy arrays
  and Python or NumPy scalars as strongly typed arrays of their default
  dtype, so that feeding a step's outputs back (e.g. the state's step
  counter) does not change the signature and recompile. The fast dispatch
  path (``fast_dispatch``) converts with this same function, so that both
  paths hand the executable the same inputs."""
  if isinstance(leaf, (jax.Array, DistributedArray, jax.ShapeDtypeStruct)):
    return leaf
  return jax.numpy.asarray(
      leaf, dtype=jax.dtypes.canonicalize_dtype(np.result_type(leaf)))


def normalize_argnums(name: str, value) -> tuple[int, ...]:
  """An ``*_argnums`` option as a tuple of ints (checked)."""
  if value is None:
    return ()
  if isinstance(value, int):
    value = (value,)
  try:
    nums = tuple(value)
  except TypeError:
    raise ValueError(f"{name} (={value!r}) must be an int or a tuple of ints")
  for n in nums:
    if not isinstance(n, int) or isinstance(n, bool):
      raise ValueError(f"{name} (={value!r}) must contain ints only")
  return nums


def resolve_argnums(nums: tuple[int, ...], nargs: int,
                    name: str) -> tuple[int, ...]:
  """Argument positions for a call with ``nargs`` arguments (negatives
  counted from the end), sorted and deduplicated."""
  out = []
  for n in nums:
    if not -nargs <= n < nargs:
      raise ValueError(f"{name} (={nums}) refers to argument {n}, but the "
                       f"function was called with {nargs} positional "
                       f"argument(s); valid positions are 0..{nargs - 1}")
    out.append(n % nargs)
  return tuple(sorted(set(out)))


def make_signature(args: Sequence[Any], *, static: tuple[int, ...],
                   donate: tuple[int, ...], batch: tuple[int, ...],
                   devices: tuple[Any, ...]) -> tuple[Signature, list[Any]]:
  """Flattens one call: (its ``Signature``, the flat array leaves).

  Args:
    args: the positional arguments.
    static, donate, batch: resolved argument positions.
    devices: the devices the step will run on.

  Raises:
    ValueError: an argument both static and donated/batch, or an unhashable
      static argument.
  """
  nargs = len(args)
  for n in donate + batch:
    if n in static:
      raise ValueError(f"argument {n} is in static_argnums and also in "
                       "donate_argnums/batch_argnums; a static argument is "
                       "a Python constant and cannot be donated or split")
  static_vals = []
  for n in static:
    try:
      hash(args[n])
    except TypeError:
      raise ValueError(f"static argument {n} (type {type(args[n]).__name__})"
                       " must be hashable; pass arrays as ordinary arguments")
    static_vals.append((n, args[n]))
  dyn = [n for n in range(nargs) if n not in static]
  leaves, treedefs, owners, paths, static_leaves = [], [], [], [], []
  for n in dyn:
    flat, treedef = jax.tree_util.tree_flatten_with_path(args[n])
    held = {k: StaticLeaf(leaf) for k, (_, leaf) in enumerate(flat)
            if not is_array_leaf(leaf)}
    if held:  # the static values go into the tree structure
      treedef = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(
          treedef, [held.get(k, leaf) for k, (_, leaf) in enumerate(flat)]))
    for k, (path, leaf) in enumerate(flat):
      name = f"arg{n}{jax.tree_util.keystr(path)}"
      if k in held:
        static_leaves.append((name, held[k]))
        continue
      leaves.append(as_input(leaf))
      owners.append(n)
      paths.append(name)
    treedefs.append(treedef)
  avals = tuple(Aval(tuple(x.shape), np.dtype(x.dtype), weak_type(x))
                for x in leaves)
  sig = Signature(nargs=nargs, dyn_argnums=tuple(dyn), treedefs=tuple(treedefs),
                  avals=avals, owners=tuple(owners), paths=tuple(paths),
                  static=tuple(static_vals),
                  static_leaves=tuple(static_leaves), donate=donate,
                  batch=batch, devices=tuple(devices))
  return sig, leaves
