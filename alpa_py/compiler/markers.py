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


# -- pipeline markers ---------------------------------------------------------
#
# ``alpa_pipeline_marker`` is an identity with a ``kind`` (one of the
# ``PIPELINE_*`` names below: plain strings, since JAX keeps them in the
# jaxpr's params). Its transpose swaps the kind, so a marker in the forward
# pass leaves a mirrored one in the backward pass:
#   "boundary" -> "boundary_bwd"  (a layer boundary, data form)
#   "loss"     -> "seed"          (the loss; its cotangent seeds the backward)
# "iteration" marks the carry between two iterations of a scan over layers
# that the pipelined compile unrolled (``compiler/unroll.py``): a layer
# boundary the layer pass may cut at.
PIPELINE_MARKER = "alpa_pipeline_marker"
PIPELINE_BOUNDARY = "boundary"
PIPELINE_BOUNDARY_BWD = "boundary_bwd"
PIPELINE_LOSS = "loss"
PIPELINE_SEED = "seed"
PIPELINE_ITERATION = "iteration"
PIPELINE_ITERATION_BWD = "iteration_bwd"
_TRANSPOSED_KIND = {PIPELINE_BOUNDARY: PIPELINE_BOUNDARY_BWD,
                    PIPELINE_BOUNDARY_BWD: PIPELINE_BOUNDARY,
                    PIPELINE_ITERATION: PIPELINE_ITERATION_BWD,
                    PIPELINE_ITERATION_BWD: PIPELINE_ITERATION,
                    PIPELINE_LOSS: PIPELINE_SEED, PIPELINE_SEED: PIPELINE_LOSS}

pipeline_marker_p = Primitive(PIPELINE_MARKER)
pipeline_marker_p.multiple_results = True
pipeline_marker_p.def_impl(lambda *xs, kind: list(xs))
pipeline_marker_p.def_abstract_eval(lambda *avals, kind: list(avals))
mlir.register_lowering(pipeline_marker_p, lambda ctx, *xs, kind: list(xs))


def _pm_jvp(primals, tangents, *, kind):
  tangents = [ad.instantiate_zeros(t) for t in tangents]
  return (pipeline_marker_p.bind(*primals, kind=kind),
          pipeline_marker_p.bind(*tangents, kind=kind))


def _pm_transpose(cts, *args, kind):
  cts = [ad.instantiate_zeros(c) if type(c) is ad.Zero else c for c in cts]
  return pipeline_marker_p.bind(*cts, kind=_TRANSPOSED_KIND[kind])


ad.primitive_jvps[pipeline_marker_p] = _pm_jvp
ad.primitive_transposes[pipeline_marker_p] = _pm_transpose
batching.primitive_batchers[pipeline_marker_p] = (
    lambda args, dims, kind: (pipeline_marker_p.bind(*args, kind=kind), dims))


# The primitive ``jax.debug.callback`` binds: the argument-less boundary
# marker is one whose callback is ``_boundary_sentinel``.
_CALLBACK_PRIMITIVE = "debug_callback"


def _boundary_sentinel():
  """Called by the positional boundary marker (does nothing at run time)."""


def is_boundary_callback(callback) -> bool:
  """Whether a ``debug_callback`` eqn's callback is our boundary sentinel."""
  seen, todo = set(), [callback]
  while todo:
    fn = todo.pop()
    if fn is _boundary_sentinel:
      return True
    if id(fn) in seen or len(seen) > 64:
      continue
    seen.add(id(fn))
    for cell in getattr(fn, "__closure__", None) or ():
      try:
        todo.append(cell.cell_contents)
      except ValueError:
        pass
    wrapped = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
    if wrapped is not None:
      todo.append(wrapped)
  return False


def is_boundary_eqn(eqn) -> bool:
  """Whether a jaxpr eqn is an argument-less ``mark_pipeline_boundary()``."""
  return (eqn.primitive.name == _CALLBACK_PRIMITIVE and
          is_boundary_callback(eqn.params.get("callback")))


def mark_pipeline_boundary(*xs):
  """Marks a layer boundary in the forward pass (for ``ManualLayerOption``).

  Call it between two layers of the model. Without arguments it marks the
  position in the traced program; with arrays it returns them unchanged,
  marked (useful inside ``jax.checkpoint`` or code JAX may reorder).

  Examples:
    >>> x = block1(x)
    >>> alpa_py.mark_pipeline_boundary()
    >>> x = block2(x)
  """
  if not xs:
    jax.debug.callback(_boundary_sentinel)
    return None
  out = pipeline_marker_p.bind(*xs, kind=PIPELINE_BOUNDARY)
  return out[0] if len(xs) == 1 else tuple(out)


def _mark_loss(fun: Callable, has_aux: bool) -> Callable:
  """Passes the loss through a "loss" marker, whose transpose seeds the
  backward pass with a "seed" marker: the compiler tells forward from
  backward ops by it."""

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    out = fun(*args, **kw)
    if has_aux:
      loss, aux = out
      return pipeline_marker_p.bind(loss, kind=PIPELINE_LOSS)[0], aux
    return pipeline_marker_p.bind(out, kind=PIPELINE_LOSS)[0]

  return wrapped


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
  g = jax.grad(_mark_loss(fun, has_aux), argnums=argnums, has_aux=has_aux,
               **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    return mark_gradients(g(*args, **kw))

  return wrapped


def value_and_grad(fun: Callable, argnums=0, has_aux: bool = False,
                   **kwargs) -> Callable:
  """``jax.value_and_grad`` with the value and gradients marked (see ``grad``)."""
  g = jax.value_and_grad(_mark_loss(fun, has_aux), argnums=argnums,
                         has_aux=has_aux, **kwargs)

  @functools.wraps(fun)
  def wrapped(*args, **kw):
    return mark_gradients(g(*args, **kw))

  return wrapped
