"""Marker primitives: identity ops that tell the compiler where things are.

``alpa_grad_marker`` wraps the result of ``alpa_py.grad``/``value_and_grad``:
everything computed before it is per-(micro-)batch gradient work, everything
after it is the optimizer update. With ``num_micro_batches`` the marked values
are averaged over micro-batches and the update runs once.

The marker has JVP, transpose and batching rules (identity on tangents,
cotangents and batched values), so it can sit anywhere in a differentiated or
vmapped function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

GRAD_MARKER = "alpa_grad_marker"

grad_marker_p = Primitive(GRAD_MARKER)
grad_marker_p.multiple_results = True
grad_marker_p.def_impl(lambda *xs: list(xs))
grad_marker_p.def_abstract_eval(lambda *avals: list(avals))
mlir.register_lowering(grad_marker_p, lambda ctx, *xs: list(xs))


def _jvp(primals, tangents):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return grad_marker_p.bind(*primals), grad_marker_p.bind(*tangents)


def _transpose(cts, *args):
  cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]
  return grad_marker_p.bind(*cts)


def _batch(args, dims):
  return grad_marker_p.bind(*args), dims


ad.primitive_jvps[grad_marker_p] = _jvp
ad.primitive_transposes[grad_marker_p] = _transpose
batching.primitive_batchers[grad_marker_p] = _batch


def mark_gradients(tree: Any) -> Any:
  """Passes a pytree of arrays through the gradient marker."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if not leaves:
    return tree
  return jax.tree_util.tree_unflatten(treedef, grad_marker_p.bind(*leaves))


def grad(fun: Callable, argnums=0, has_aux: bool = False, **kwargs) -> Callable:
  """``jax.grad`` whose result is marked as the step's gradients.

  Same signature as ``jax.grad``. Inside an ``@alpa_py.parallelize`` step with
  ``num_micro_batches``, the gradients (and ``aux``) are averaged over
  micro-batches before the code that uses them runs once.
  """
  g = jax.grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    return mark_gradients(g(*args, **kw))

  return wrapped


def value_and_grad(fun: Callable, argnums=0, has_aux: bool = False,
                   **kwargs) -> Callable:
  """``jax.value_and_grad`` with the value and gradients marked (see ``grad``)."""
  g = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    return mark_gradients(g(*args, **kw))

  return wrapped
