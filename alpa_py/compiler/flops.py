"""FLOPs of one primitive application (the cost model's work measure).

A dot or convolution counts its multiply-adds; a ``scan`` its body's FLOPs
times its trip count; a ``while`` or ``cond`` one pass of its body (or
branches); anything else the elements it reads and writes.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from jax.extend import core as jcore


def _info(aval):
  shape = tuple(int(d) for d in getattr(aval, "shape", ()))
  return SimpleNamespace(shape=shape, size=int(math.prod(shape)))


def _sub_jaxprs_flops(params: dict) -> float:
  """FLOPs of the bodies of a control-flow op (one iteration / one branch)."""
  total = 0.0
  for v in params.values():
    seq = v if isinstance(v, (tuple, list)) else (v,)
    for item in seq:
      jaxpr = None
      if isinstance(item, jcore.ClosedJaxpr):
        jaxpr = item.jaxpr
      elif isinstance(item, jcore.Jaxpr):
        jaxpr = item
      if jaxpr is None:
        continue
      for eqn in jaxpr.eqns:
        ins = [_info(x.aval) for x in eqn.invars]
        outs = [_info(x.aval) for x in eqn.outvars]
        total += op_flops(eqn.primitive.name, eqn.params, ins, outs)
  return total


def op_flops(name: str, params: dict, ins: list, outs: list) -> float:
  """Floating-point operations of one primitive application."""
  if name == "dot_general":
    (lc, _), _ = params["dimension_numbers"]
    contract = math.prod(ins[0].shape[d] for d in lc)
    return 2.0 * outs[0].size * contract
  if name == "conv_general_dilated":
    rhs = ins[1]
    dn = params["dimension_numbers"]
    rhs_spec = dn.rhs_spec
    kernel_spatial = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    in_feat = rhs.shape[rhs_spec[1]]
    return 2.0 * outs[0].size * in_feat * kernel_spatial
  if name in ("scan", "while", "cond"):
    body = _sub_jaxprs_flops(params)
    length = params.get("length", 1) if name == "scan" else 1
    return body * max(int(length), 1)
  return float(sum(o.size for o in outs) + sum(i.size for i in ins))
