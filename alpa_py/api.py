"""``parallelize``: the user's entry point, with the executable cache."""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable, Sequence

from alpa_py import driver
from alpa_py.driver.batch_args import NoBatch, infer_batch_argnums
from alpa_py.driver.fast_dispatch import DispatchCache
from alpa_py.driver.signature import (Signature, StaticLeaf, make_signature,
                                      normalize_argnums, resolve_argnums)
from alpa_py.methods import PipeshardParallel, ShardParallel
from alpa_py.runtime.cluster import current_cluster

# A static value (a static argument, or a non-array leaf of an argument) seen
# with this many distinct values has compiled the step as many times: warn.
RECOMPILES_BEFORE_WARNING = 5


class RecompileWarning(UserWarning):
  """A static value changes between calls, so each call compiles again."""


class ParallelizedFunc:
  """A step function compiled on first call for each input signature."""

  def __init__(self, fun: Callable, method: ShardParallel,
               static_argnums, donate_argnums, batch_argnums):
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
    # None: inferred for each signature (``driver.batch_args``)
    self.batch_argnums = (None if batch_argnums is None else
                          normalize_argnums("batch_argnums", batch_argnums))
    self._cache: dict = {}
    # in front of ``_cache``: a call keyed without per-leaf path work
    self._dispatch = DispatchCache(self.static_argnums)
    self._static_seen: dict[str, set[StaticLeaf]] = {}
    functools.update_wrapper(self, fun)

  def __call__(self, *args, **kwargs):
    """Runs the step, compiling it first for a new input signature.

    A call whose cheap key (``fast_dispatch``) was seen before goes straight
    to its executable; the full signature is made only on a miss, and the
    key then remembers the executable it chose.
    """
    if kwargs:
      raise ValueError(f"pass arguments positionally; got keyword arguments "
                       f"{sorted(kwargs)}")
    backend = current_cluster()
    fast = self._dispatch.key(args, backend.serial)
    if fast is not None:
      ex = self._dispatch.get(fast[0])
      if ex is not None:
        return ex.call_flat(fast[1])
    ex, leaves = self._executable_and_leaves(args, backend)
    if fast is not None:
      self._dispatch.put(fast[0], ex, fast[1], leaves)
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
    self._dispatch.clear()
    self._static_seen.clear()

  # -- internals -----------------------------------------------------------

  def _executable_and_leaves(self, args, backend=None):
    backend = backend or current_cluster()
    sig, leaves = self._signature(args, backend)
    key = (sig, self.method, backend.serial)
    ex = self._cache.get(key)
    if ex is None:
      self._note_static_values(sig)
      # an inferred batch is a function of the rest of the key: the key
      # holds the signature before inference, so a call never infers
      ex = driver.compile_step(self.fun, self._with_batch(sig), self.method,
                               backend, leaves)
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
    batch = () if self.batch_argnums is None else resolve_argnums(
        self.batch_argnums, nargs, "batch_argnums")
    return make_signature(
        args, static=resolve_argnums(self.static_argnums, nargs,
                                     "static_argnums"),
        donate=resolve_argnums(self.donate_argnums, nargs, "donate_argnums"),
        batch=batch, devices=self.method.devices or backend.devices)

  def _with_batch(self, sig: Signature) -> Signature:
    """``sig`` with its batch arguments inferred, where they were not given.

    Raises:
      ValueError: they cannot be inferred and the method splits the batch.
    """
    if self.batch_argnums is not None:
      return sig
    batch = infer_batch_argnums(self.fun, sig, self._name())
    if isinstance(batch, NoBatch):
      if self.method.splits_batch:
        raise batch.error()
      batch = ()  # the method does not split it: nothing to get wrong
    return dataclasses.replace(sig, batch=batch)

  def _note_static_values(self, sig: Signature) -> None:
    """Counts each static value's distinct values over the compiles; warns
    once per path at ``RECOMPILES_BEFORE_WARNING``."""
    held = [(f"arg{n}", StaticLeaf(v)) for n, v in sig.static]
    for path, value in held + list(sig.static_leaves):
      seen = self._static_seen.setdefault(path, set())
      if len(seen) >= RECOMPILES_BEFORE_WARNING:
        continue
      seen.add(value)
      if len(seen) == RECOMPILES_BEFORE_WARNING:
        warnings.warn(
            f"{self._name()} was compiled for {len(seen)} different values of "
            f"the static {path} (now {value.value!r:.60}); each new value "
            "compiles the step again. Static values are static_argnums and "
            "the non-array leaves of the arguments (functions, strings, "
            "objects), compared by value where hashable, else by identity: "
            "pass a value that changes between calls as an array, or reuse "
            "one object.", RecompileWarning, stacklevel=4)

  def _name(self) -> str:
    return getattr(self.fun, "__name__", "the step")


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
      data-parallel methods and into micro-batches). Default: inferred per
      input signature, as the arguments whose array leaves all lead with one
      size B > 1 (static and donated arguments excluded, and arguments the
      step returns the next value of where several share B); a ValueError
      names the candidates where none or several sizes qualify and the
      method splits the batch.

  Returns:
    A ``ParallelizedFunc``: call it like ``fun``; ``get_executable(*args)``
    returns the compiled ``Executable`` with its plan.

  Examples:
    >>> @alpa_py.parallelize
    ... def train_step(state, batch): ...
  """
  def wrap(f):
    return ParallelizedFunc(f, method or ShardParallel(), static_argnums,
                            donate_argnums, batch_argnums)

  return wrap if fun is None else wrap(fun)
