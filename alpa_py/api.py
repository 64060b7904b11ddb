"""``parallelize``: the user's entry point, with the executable cache."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import numpy as np

from alpa_py.methods import PipeshardParallel, ShardParallel
from alpa_py.runtime.cluster import current_cluster


def _normalize_argnums(name: str, value) -> tuple[int, ...]:
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


def _resolve(nums: tuple[int, ...], nargs: int, name: str) -> tuple[int, ...]:
  out = []
  for n in nums:
    if not -nargs <= n < nargs:
      raise ValueError(f"{name} (={nums}) refers to argument {n}, but the "
                       f"function was called with {nargs} positional "
                       f"argument(s); valid positions are 0..{nargs - 1}")
    out.append(n % nargs)
  return tuple(sorted(set(out)))


def _is_array_leaf(x) -> bool:
  from alpa_py.runtime.ray_cluster import DistributedArray
  return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number,
                        DistributedArray)) and not isinstance(x, str)


class ParallelizedFunc:
  """A step function compiled on first call for each input signature."""

  def __init__(self, fun: Callable, method: ShardParallel,
               static_argnums, donate_argnums, batch_argnums,
               batch_argnums_given: bool):
    if not callable(fun):
      raise TypeError(f"parallelize expects a function, got {type(fun).__name__}")
    if not isinstance(method, (ShardParallel, PipeshardParallel)):
      raise TypeError("method must be ShardParallel, DataParallel, "
                      "Zero2Parallel, Zero3Parallel or PipeshardParallel, got "
                      f"{method!r}")
    self.fun = fun
    self.method = method
    self.static_argnums = _normalize_argnums("static_argnums", static_argnums)
    self.donate_argnums = _normalize_argnums("donate_argnums", donate_argnums)
    self.batch_argnums = _normalize_argnums("batch_argnums", batch_argnums)
    self._batch_given = batch_argnums_given
    self._cache: dict = {}
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    if kwargs:
      raise ValueError(f"pass arguments positionally; got keyword arguments "
                       f"{sorted(kwargs)}")
    ex, leaves = self._executable_and_leaves(args)
    return ex.call_flat(leaves)

  def get_executable(self, *args):
    """The compiled ``Executable`` for these arguments (compiled if needed)."""
    return self._executable_and_leaves(args)[0]

  def clear_cache(self) -> None:
    self._cache.clear()

  # -- internals -----------------------------------------------------------

  def _executable_and_leaves(self, args):
    sig = self._signature(args)
    ex = self._cache.get(sig.key)
    if ex is None:
      if getattr(sig.cluster, "kind", "local") == "ray":
        if isinstance(self.method, PipeshardParallel):
          from alpa_py.pipeshard_parallel import compile_pipeshard
          from alpa_py.runtime.ray_pipeshard import RayPipeshardExecutable
          ex = RayPipeshardExecutable(
              compile_pipeshard(self.fun, sig, self.method), sig.cluster)
          self._cache[sig.key] = ex
          return ex, sig.leaves
        from alpa_py.runtime.ray_executable import RayExecutable
        from alpa_py.shard_parallel import compile_step
        ex = RayExecutable(compile_step(self.fun, args, sig, self.method),
                           sig.cluster)
      elif isinstance(self.method, PipeshardParallel):
        from alpa_py.pipeshard_parallel import compile_pipeshard
        ex = compile_pipeshard(self.fun, sig, self.method)
      else:
        from alpa_py.shard_parallel import compile_step
        ex = compile_step(self.fun, args, sig, self.method)
      self._cache[sig.key] = ex
    return ex, sig.leaves

  def _signature(self, args) -> "Signature":
    nargs = len(args)
    static = _resolve(self.static_argnums, nargs, "static_argnums")
    donate = _resolve(self.donate_argnums, nargs, "donate_argnums")
    if self._batch_given:
      batch = _resolve(self.batch_argnums, nargs, "batch_argnums")
    else:
      batch = tuple(n for n in self.batch_argnums if n < nargs)
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
    leaves, treedefs, owners, paths = [], [], [], []
    for n in dyn:
      flat, treedef = jax.tree_util.tree_flatten_with_path(args[n])
      for path, leaf in flat:
        if not _is_array_leaf(leaf):
          raise ValueError(
              f"argument {n} has a non-array value at "
              f"{jax.tree_util.keystr(path) or '(top level)'}: "
              f"{type(leaf).__name__} {leaf!r:.60}. Pass it in static_argnums="
              f"({n},) or convert it to an array.")
        if not isinstance(leaf, jax.Array) and not hasattr(leaf, "handle"):
          # Python scalars become strongly typed arrays of their default
          # dtype, so that feeding a step's outputs back (e.g. the state's
          # step counter) does not change the signature and recompile.
          leaf = jax.numpy.asarray(
              leaf, dtype=jax.dtypes.canonicalize_dtype(np.result_type(leaf)))
        leaves.append(leaf)
        owners.append(n)
        paths.append(f"arg{n}{jax.tree_util.keystr(path)}")
      treedefs.append(treedef)
    avals = tuple((tuple(x.shape), str(x.dtype), weak_type(x)) for x in leaves)
    cluster = current_cluster()
    devices = self.method.devices or cluster.devices
    key = (tuple(treedefs), avals, tuple(static_vals), self.method, donate,
           batch, tuple(d.id for d in devices), id(cluster))
    return Signature(key=key, leaves=leaves, cluster=cluster, treedefs=tuple(treedefs),
                     dyn_argnums=tuple(dyn), static=tuple(static_vals),
                     donate=donate, batch=batch, owners=tuple(owners),
                     paths=tuple(paths), devices=tuple(devices),
                     nargs=nargs)


def weak_type(x) -> bool:
  if hasattr(x, "handle"):  # a DistributedArray
    return False
  return bool(getattr(jax.typeof(x), "weak_type", False))


class Signature:
  """One call's flattened arguments and everything the cache key needs."""

  def __init__(self, **kw):
    self.__dict__.update(kw)

  def rebuild_args(self, leaves) -> list[Any]:
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


def parallelize(fun: Callable | None = None, *, method: ShardParallel | None = None,
                static_argnums: int | Sequence[int] = (),
                donate_argnums: int | Sequence[int] = (),
                batch_argnums: int | Sequence[int] | None = None):
  """Turns a single-device training step into a sharded one.

  Usable bare (``@parallelize``) or with arguments
  (``@parallelize(method=alpa_py.Zero3Parallel())``).

  Args:
    fun: the step, e.g. ``train_step(state, batch) -> (state, metrics)``.
    method: ``ShardParallel()`` (default), ``DataParallel()``,
      ``Zero2Parallel()`` or ``Zero3Parallel()``.
    static_argnums: positions of arguments that are Python constants.
    donate_argnums: positions whose buffers the step may reuse (do not read
      them after the call).
    batch_argnums: positions of the data batch (split across devices by
      data-parallel methods and into micro-batches); default ``(1,)``.

  Returns:
    A ``ParallelizedFunc``: call it like ``fun``; ``get_executable(*args)``
    returns the compiled ``Executable`` with its plan.

  Examples:
    >>> @alpa_py.parallelize
    ... def train_step(state, batch): ...
  """
  given = batch_argnums is not None
  batch = (1,) if batch_argnums is None else batch_argnums

  def wrap(f):
    return ParallelizedFunc(f, method or ShardParallel(), static_argnums,
                            donate_argnums, batch, given)

  return wrap if fun is None else wrap(fun)
