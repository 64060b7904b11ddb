"""The cheap per-call key of ``parallelize``, in front of the full signature.

``make_signature`` names every leaf (``tree_flatten_with_path``, ``keystr``)
and builds a frozen ``Signature``: right for a compile and for messages, but
it costs tens of microseconds per leaf, and a training loop calls the step
with the same structure every time. ``DispatchCache`` keys a call as
``jax.jit`` does: one C++ ``tree_flatten`` of the arguments, then per leaf
its abstract value (``x.aval``: an attribute of a JAX array, whose equality
covers shape, dtype and weak type; JAX interns avals, so comparing two keys
is mostly identity checks). The key maps to the executable the full
signature chose on the first call with that key; the signature runs again
only on a miss.

The key must never merge two calls that the signature tells apart: equal
keys mean equal signatures. It holds the backend's serial, the argument
count, the static arguments (type and value), the flat tree structure (dict
keys, node types and their static data) and per leaf its aval. Where the
arguments hold anything but JAX arrays, each leaf is classified as
``make_signature`` classifies it: NumPy arrays and Python/NumPy scalars are
converted by the same ``as_input`` (so they key, and run, as the strongly
typed arrays the signature sees), and non-array leaves enter the key as the
same ``StaticLeaf`` values the signature holds. Remote arrays and abstract
values (``DistributedArray``, ``ShapeDtypeStruct``) and unhashable static
arguments get no key: those calls take the full path, which raises or
handles them as before.
"""

from __future__ import annotations

import operator
from typing import Any

import jax

from alpa_py.driver.signature import StaticLeaf, as_input, is_array_leaf
from alpa_py.runtime.distributed_array import DistributedArray

_AVAL = operator.attrgetter("aval")
_NO_FAST_KEY = (DistributedArray, jax.ShapeDtypeStruct)


def _mixed_key(leaves: list) -> tuple[tuple, list] | None:
  """Per-leaf key and run inputs where some leaf is not a JAX array (the
  slower, still path-free classification), or None for no fast key."""
  items, inputs = [], []
  for x in leaves:
    if isinstance(x, _NO_FAST_KEY):
      return None
    if is_array_leaf(x):
      x = as_input(x)
      items.append(x.aval)
      inputs.append(x)
    else:
      items.append(StaticLeaf(x))
  return tuple(items), inputs


def _typed(key) -> tuple:
  """``key`` with each aval reduced to what the signature's ``Aval`` holds."""
  *head, avals = key
  return (*head, tuple(
      a if isinstance(a, StaticLeaf) else (a.shape, a.dtype, a.weak_type)
      for a in avals))


class DispatchCache:
  """Cheap call key -> loaded executable.

  Args:
    static_argnums: the function's static argument positions (unresolved:
      negative positions count from the end of each call's arguments).
  """

  def __init__(self, static_argnums: tuple[int, ...]):
    self._static_argnums = static_argnums
    self._static_by_nargs: dict[int, tuple[int, ...] | None] = {}
    self._entries: dict = {}
    self._typed: dict = {}

  def __len__(self) -> int:
    return len(self._entries)

  def clear(self) -> None:
    self._entries.clear()
    self._typed.clear()

  def _static(self, nargs: int) -> tuple[int, ...] | None:
    """Resolved static positions for ``nargs`` arguments (None where they do
    not resolve: the full path raises the error)."""
    try:
      return self._static_by_nargs[nargs]
    except KeyError:
      pass
    out: tuple[int, ...] | None = None
    if all(-nargs <= n < nargs for n in self._static_argnums):
      out = tuple(sorted({n % nargs for n in self._static_argnums}))
    self._static_by_nargs[nargs] = out
    return out

  def key(self, args: tuple, serial: int) -> tuple[Any, list] | None:
    """(key, flat run inputs) of a call, or None where only the full
    signature can key it."""
    nargs = len(args)
    static = self._static(nargs)
    if static is None:
      return None
    held: tuple = ()
    if static:
      held = tuple((n, type(args[n]), args[n]) for n in static)
      try:
        hash(held)
      except TypeError:  # the full path names the unhashable argument
        return None
      args = tuple(a for n, a in enumerate(args) if n not in static)
    leaves, treedef = jax.tree_util.tree_flatten(args)
    try:
      # every leaf a JAX array: the common case, one attribute per leaf
      avals = tuple(map(_AVAL, leaves))
    except AttributeError:
      mixed = _mixed_key(leaves)
      if mixed is None:
        return None
      avals, leaves = mixed
    return (serial, nargs, held, treedef, avals), leaves

  def get(self, key) -> Any:
    """The executable for ``key``, or None.

    An aval also holds the array's abstract sharding, which the signature
    ignores: a call whose avals differ from a known key's in that alone
    (e.g. fresh single-device arrays, then a step's outputs on the mesh)
    is found by its typed key (shape, dtype, weak type per leaf: the
    signature's ``Aval``), and its own key is remembered for next time.
    """
    ex = self._entries.get(key)
    if ex is None:
      ex = self._typed.get(_typed(key))
      if ex is not None:
        self._entries[key] = ex
    return ex

  def put(self, key, executable, fast_leaves: list, leaves: list) -> None:
    """Remembers ``executable`` for ``key``, where the fast inputs are the
    full path's (an object that has an ``aval`` but is no array leaf, which
    the signature would hold static, gets no entry)."""
    if len(fast_leaves) != len(leaves):
      return
    for a, b in zip(fast_leaves, leaves):
      if a is not b and not (isinstance(a, jax.Array) and
                             isinstance(b, jax.Array)):
        return
    self._entries[key] = executable
    self._typed[_typed(key)] = executable
