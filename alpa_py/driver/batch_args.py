"""Which arguments are the data batch, where ``batch_argnums`` is not given.

A batch argument is one whose array leaves all have a leading dimension of
one size B > 1: the examples. ``batch`` in ``train_step(params, opt_state,
batch)`` is one; a train state is not, as it holds scalars (a step counter,
optax's ``count``) or parameters of several leading sizes. Static and donated
arguments are never the batch. Where several arguments qualify, those whose
next value the step returns are not the batch (a weight matrix, or
parameters whose leaves all happen to lead with one size: told apart by one
abstract evaluation of the step, run only then); the others are the batch
if they share one B (``step(state, x, y)``). Qualifying arguments of
different B, or none at all, leave the batch undetermined: a ``NoBatch``,
which is an error for a method that splits the batch.

Inference reads the ``Signature`` alone (and, where several arguments
qualify, traces the step abstractly once), so it runs once per signature,
when the step compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from alpa_py.driver.signature import Signature, hide_static


@dataclasses.dataclass(frozen=True)
class NoBatch:
  """Why no batch arguments could be inferred.

  Attributes:
    reason: what was found, naming the candidate positions and their
      leading sizes.
  """

  reason: str

  def error(self, where: str = "alpa_py.parallelize") -> ValueError:
    """The error to raise where the batch is needed (``where`` takes
    ``batch_argnums=``)."""
    return ValueError(
        f"{self.reason}. Pass batch_argnums= to {where}: the "
        "positions of the data batch, which data-parallel methods and "
        "micro-batches split along dim 0 (e.g. batch_argnums=(2,) for "
        "train_step(params, opt_state, batch))")


def leading_sizes(sig: Signature) -> dict[int, tuple[int | None, ...]]:
  """Per array argument that could be the batch (not donated, with at least
  one array leaf): the distinct leading sizes of its leaves, sorted (None for
  a scalar)."""
  sizes: dict[int, set] = {}
  for aval, owner in zip(sig.avals, sig.owners):
    if owner not in sig.donate:
      sizes.setdefault(owner, set()).add(aval.shape[0] if aval.shape else None)
  return {n: tuple(sorted(s, key=lambda b: -1 if b is None else b))
          for n, s in sorted(sizes.items())}


def infer_batch_argnums(fun: Callable, sig: Signature,
                        name: str = "the step") -> tuple[int, ...] | NoBatch:
  """The batch argument positions of a call (see the module docstring).

  Args:
    fun: the step (traced abstractly only where several arguments
      qualify).
    sig: the call's signature (its ``batch`` is not read).
    name: the step's name, for messages.

  Returns:
    The positions, sorted; or ``NoBatch`` saying why there are none.
  """
  sizes = leading_sizes(sig)
  qualify = {n: s[0] for n, s in sizes.items()
             if len(s) == 1 and s[0] is not None and s[0] > 1}
  if not qualify:
    found = "; ".join(f"arg {n}: {_describe(s)}" for n, s in sizes.items())
    return NoBatch(f"could not infer the batch argument of {name}: no "
                   "argument has array leaves that all lead with one size "
                   f"> 1 ({found or 'no array argument'})")
  if len(qualify) > 1:
    returned = _returned_args(fun, sig, tuple(qualify))
    if len(returned) < len(qualify):
      qualify = {n: b for n, b in qualify.items() if n not in returned}
  if len(set(qualify.values())) > 1:
    found = ", ".join(f"arg {n} (leading size {b})" for n, b in qualify.items())
    return NoBatch(f"the batch argument of {name} is ambiguous: {found} "
                   "could each be the batch, with different batch sizes")
  return tuple(qualify)


def _describe(sizes: tuple[int | None, ...]) -> str:
  shown = ["scalar" if b is None else str(b) for b in sizes[:4]]
  more = ", ..." if len(sizes) > 4 else ""
  return f"leading sizes [{', '.join(shown)}{more}]"


def _returned_args(fun: Callable, sig: Signature,
                   candidates: tuple[int, ...]) -> set[int]:
  """The candidates whose next value the step returns: the whole output or
  an item of an output tuple has the argument's structure, shapes and
  dtypes (the state, or gradients of the parameters)."""

  def flat_fun(*leaves):
    return hide_static(fun(*sig.rebuild_args(leaves)))

  out = hide_static(jax.eval_shape(flat_fun, *[a.sds() for a in sig.avals]))
  subtrees = [out] + (list(out) if isinstance(out, (tuple, list)) else [])
  flat_outs = [jax.tree_util.tree_flatten(t) for t in subtrees]
  returned = set()
  for n in candidates:
    k = sig.dyn_argnums.index(n)
    avals = [a for a, o in zip(sig.avals, sig.owners) if o == n]
    if any(treedef == sig.treedefs[k] and _same_avals(leaves, avals)
           for leaves, treedef in flat_outs):
      returned.add(n)
  return returned


def _same_avals(leaves: list[Any], avals) -> bool:
  return all(tuple(x.shape) == a.shape and x.dtype == a.dtype
             for x, a in zip(leaves, avals))
