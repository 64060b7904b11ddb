"""``parallelize``: the user's entry point, with the executable cache."""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

from alpa_py import driver
from alpa_py.driver.signature import (Signature, make_signature,
                                      normalize_argnums, resolve_argnums)
from alpa_py.methods import PipeshardParallel, ShardParallel
from alpa_py.runtime.cluster import current_cluster


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
    self.static_argnums = normalize_argnums("static_argnums", static_argnums)
    self.donate_argnums = normalize_argnums("donate_argnums", donate_argnums)
    self.batch_argnums = normalize_argnums("batch_argnums", batch_argnums)
    self._batch_given = batch_argnums_given
    self._cache: dict = {}
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    if kwargs:
      raise ValueError(f"pass arguments positionally; got keyword arguments "
                       f"{sorted(kwargs)}")
    ex, leaves = self._executable_and_leaves(args)
    return ex.call_flat(leaves)

  def get_executable(self, *args, dump_dir: str | None = None):
    """The compiled ``Executable`` for these arguments (compiled if needed).

    Args:
      *args: arguments like the step's.
      dump_dir: if given, the plan and optimized HLO are written there (from
        the cached executable: dumping never recompiles). The environment
        variable ``ALPA_PY_DUMP_DIR`` does the same for every compile.
    """
    ex = self._executable_and_leaves(args)[0]
    if dump_dir is not None:
      ex.dump(dump_dir)
    return ex

  def clear_cache(self) -> None:
    self._cache.clear()

  # -- internals -----------------------------------------------------------

  def _executable_and_leaves(self, args):
    backend = current_cluster()
    sig, leaves = self._signature(args, backend)
    key = (sig, self.method, backend.serial)
    ex = self._cache.get(key)
    if ex is None:
      ex = driver.compile_step(self.fun, sig, self.method, backend)
      self._cache[key] = ex
      dump_dir = os.environ.get("ALPA_PY_DUMP_DIR")
      if dump_dir:
        name = getattr(self.fun, "__name__", "step")
        ex.dump(os.path.join(dump_dir, f"{name}-{len(self._cache)}"))
    return ex, leaves

  def _signature(self, args, backend=None) -> tuple[Signature, list]:
    """The call's ``Signature`` and flat leaves."""
    backend = backend or current_cluster()
    nargs = len(args)
    if self._batch_given:
      batch = resolve_argnums(self.batch_argnums, nargs, "batch_argnums")
    else:
      batch = tuple(n for n in self.batch_argnums if n < nargs)
    return make_signature(
        args, static=resolve_argnums(self.static_argnums, nargs,
                                     "static_argnums"),
        donate=resolve_argnums(self.donate_argnums, nargs, "donate_argnums"),
        batch=batch, devices=self.method.devices or backend.devices)


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
      ``Zero2Parallel()``, ``Zero3Parallel()`` or ``PipeshardParallel()``.
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
