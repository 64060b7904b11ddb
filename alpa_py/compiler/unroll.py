"""Scans over layers, unrolled so that a pipeline can cut between layers.

A model written the MaxText / levanter way runs its blocks under
``nn.scan``: one ``scan`` op holds every layer, and its backward is another.
The intra-op pass plans through a scan's body (``graph``), but a pipeline
stage is a range of layers, and a scan cannot be cut. So the pipelined
compile evaluates the traced step with each *layer scan* run as a Python
loop and traces that again: iteration ``i`` becomes ordinary ops that read
slice ``i`` of the stacked operands, and the stacked results are stacked
from the iterations' (the per-layer gradients of stacked parameters, for
the backward scan). The carry between two iterations passes through an
"iteration" pipeline marker: the layer pass sees the iterations as layers
(``ManualLayerOption`` cuts at every one; ``AutoLayerOption`` groups whole
iterations).

A stacked result that another unrolled scan reads (the forward scan's
residuals, read by the backward scan) is not stacked and sliced again:
iteration ``i`` of the reader takes iteration ``i``'s value directly, so that
layer ``i``'s backward depends on layer ``i``'s forward alone (a stack would
tie every backward iteration to the last forward layer).

A layer scan is one whose body (or a call inside it) has a dot or a
convolution; a scan over time with elementwise work (a linear recurrence)
stays a scan. The unrolled step computes the same values; only its program
is longer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

try:
  from jax.extend import core as jcore
except ImportError:  # pragma: no cover - older JAX
  from jax import core as jcore

from alpa_py.compiler.markers import PIPELINE_ITERATION, pipeline_marker_p

_HEAVY = frozenset({"dot_general", "conv_general_dilated"})


def _sub_jaxprs(params: dict):
  for v in params.values():
    for item in v if isinstance(v, (tuple, list)) else (v,):
      if isinstance(item, jcore.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        yield item


def has_heavy_op(jaxpr) -> bool:
  """Whether ``jaxpr`` (or one nested in it) has a dot or a convolution."""
  return any(eqn.primitive.name in _HEAVY or any(
      has_heavy_op(sub) for sub in _sub_jaxprs(eqn.params))
             for eqn in jaxpr.eqns)


def is_layer_scan(eqn) -> bool:
  """A ``scan`` whose body does dots or convolutions (see module doc)."""
  return eqn.primitive.name == "scan" and has_heavy_op(
      eqn.params["jaxpr"].jaxpr)


def has_layer_scan(jaxpr) -> bool:
  return any(is_layer_scan(eqn) or any(
      has_layer_scan(sub) for sub in _sub_jaxprs(eqn.params))
             for eqn in jaxpr.eqns)


# Call-like primitives whose body is evaluated inline when it holds a layer
# scan (as ``graph`` inlines them anyway).
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
          "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr"}


class _Stacked:
  """A scan result kept as its iterations' values; stacked on first use by
  anything other than another unrolled scan."""

  def __init__(self, items: list):
    self.items = items
    self._array = None

  def array(self):
    if self._array is None:
      self._array = jnp.stack(self.items)
    return self._array


def _materialize(v):
  return v.array() if isinstance(v, _Stacked) else v


def _eval(jaxpr, consts, args, keep_stacked: bool = False) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = eqn.params.get(_CALLS.get(name, ""), None)
    if is_layer_scan(eqn):
      outs = _unrolled_scan(eqn.params, ins)
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
      continue
    if sub is not None and has_layer_scan(
        sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub):
      # inlined: stacked values pass through to the scans inside
      if isinstance(sub, jcore.ClosedJaxpr):
        outs = _eval(sub.jaxpr, sub.consts, ins, keep_stacked=True)
      else:
        outs = _eval(sub, (), ins, keep_stacked=True)
    else:
      outs = eqn.primitive.bind(*[_materialize(v) for v in ins],
                                **eqn.params)
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for var, val in zip(eqn.outvars, outs):
      env[var] = val
  outs = [read(v) for v in jaxpr.outvars]
  return outs if keep_stacked else [_materialize(v) for v in outs]


def _slice(x, i: int):
  if isinstance(x, _Stacked):
    return x.items[i]
  return jax.lax.index_in_dim(x, i, keepdims=False)


def _unrolled_scan(params: dict, ins: list) -> list:
  nc, ncarry, length = (params["num_consts"], params["num_carry"],
                        params["length"])
  body = params["jaxpr"]
  consts = [_materialize(v) for v in ins[:nc]]
  carry = [_materialize(v) for v in ins[nc:nc + ncarry]]
  xs = ins[nc + ncarry:]
  ys: dict[int, list] = {}
  order = range(length - 1, -1, -1) if params["reverse"] else range(length)
  for i in order:
    out = _eval(body.jaxpr, body.consts,
                consts + carry + [_slice(x, i) for x in xs])
    carry, ys[i] = out[:ncarry], out[ncarry:]
    if carry and len(ys) < length:  # a layer boundary between iterations
      carry = list(pipeline_marker_p.bind(*carry, kind=PIPELINE_ITERATION))
  num_ys = len(body.jaxpr.outvars) - ncarry
  return carry + [_Stacked([ys[i][k] for i in range(length)])
                  for k in range(num_ys)]


def unrolled(closed) -> Callable[..., Any] | None:
  """A function of the jaxpr's inputs that runs ``closed`` with each layer
  scan unrolled; None where it has none."""
  if not has_layer_scan(closed.jaxpr):
    return None

  def run(*args):
    return _eval(closed.jaxpr, closed.consts, args)

  return run
