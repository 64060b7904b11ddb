"""Jaxpr -> OpGraph: a flat list of operations over numbered tensors.

Call-like primitives (``jit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``) are inlined, because a sharding decision inside
them is as free as one outside. Control flow (``scan``, ``while``, ``cond``) stays
one node: its body runs on every iteration with the same sharding, so the
strategy rules treat it as a whole.

The graph records, per op, FLOPs and bytes (for the cost model) and, per tensor,
where it is defined and last used (for the memory constraint).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.extend import core as jcore

from alpa_py.compiler.markers import (GRAD_MARKER, PIPELINE_BOUNDARY,
                                      PIPELINE_MARKER, is_boundary_eqn)

# Primitives whose body is inlined into the surrounding graph; the value is the
# name of the parameter that holds the body.
_INLINE_PARAMS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Shape and dtype of one graph tensor."""

  shape: tuple[int, ...]
  dtype: Any

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def nbytes(self) -> int:
    try:
      itemsize = np.dtype(self.dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys
      itemsize = 8
    return self.size * itemsize


@dataclasses.dataclass(frozen=True)
class Literal:
  """A constant operand embedded in an op (a jaxpr Literal)."""

  value: Any


Operand = "int | Literal"  # a tensor id, or a literal


@dataclasses.dataclass
class Op:
  """One primitive application in the flattened graph."""

  index: int
  primitive: Any
  params: dict
  inputs: tuple  # tensor ids (int) or Literal
  outputs: tuple[int, ...]
  flops: float = 0.0
  bytes_accessed: float = 0.0

  @property
  def name(self) -> str:
    return self.primitive.name


@dataclasses.dataclass
class OpGraph:
  """A flattened training step."""

  tensors: list[TensorInfo]
  ops: list[Op]
  invars: tuple[int, ...]
  outvars: tuple  # tensor ids or Literal
  consts: dict[int, Any]  # tensor id -> value
  producer: dict[int, int]  # tensor id -> op index (absent for inputs/consts)
  consumers: dict[int, list[int]]  # tensor id -> op indices
  last_use: dict[int, int]  # tensor id -> last position using it (len(ops) = output)
  grad_marked: tuple = ()  # per alpa_py.grad marker, the refs it marks
  # (position in ops, kind, refs) per pipeline marker, in program order
  pipeline_marks: tuple = ()

  @functools.cached_property
  def outvar_set(self) -> frozenset:
    return frozenset(t for t in self.outvars if isinstance(t, int))

  def tensor(self, t: int) -> TensorInfo:
    return self.tensors[t]

  def summary(self) -> str:
    counts: dict[str, int] = {}
    for op in self.ops:
      counts[op.name] = counts.get(op.name, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
    flops = sum(op.flops for op in self.ops)
    return (f"{len(self.ops)} ops, {len(self.tensors)} tensors, "
            f"{flops / 1e9:.3f} GFLOP; most frequent: "
            + ", ".join(f"{k}x{v}" for k, v in top))


def _aval_info(aval) -> TensorInfo:
  shape = tuple(int(d) for d in getattr(aval, "shape", ()))
  return TensorInfo(shape, getattr(aval, "dtype", None))


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
  key = _INLINE_PARAMS.get(eqn.primitive.name)
  if key is None or key not in eqn.params:
    return None
  sub = eqn.params[key]
  if isinstance(sub, jcore.ClosedJaxpr):
    return sub.jaxpr, sub.consts
  if isinstance(sub, jcore.Jaxpr):
    return sub, ()
  return None


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
        ins = [_aval_info(x.aval) for x in eqn.invars]
        outs = [_aval_info(x.aval) for x in eqn.outvars]
        total += op_flops(eqn.primitive.name, eqn.params, ins, outs)
  return total


def op_flops(name: str, params: dict, ins: list[TensorInfo],
             outs: list[TensorInfo]) -> float:
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


class _Builder:

  def __init__(self):
    self.tensors: list[TensorInfo] = []
    self.ops: list[Op] = []
    self.consts: dict[int, Any] = {}
    self.grad_marked: list[tuple] = []
    self.pipeline_marks: list[tuple] = []

  def new_tensor(self, aval) -> int:
    self.tensors.append(_aval_info(aval))
    return len(self.tensors) - 1

  def add_jaxpr(self, jaxpr, consts, in_refs) -> list:
    env: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return Literal(v.val)
      return env[v]

    for var, val in zip(jaxpr.constvars, consts):
      t = self.new_tensor(var.aval)
      self.consts[t] = val
      env[var] = t
    for var, ref in zip(jaxpr.invars, in_refs):
      env[var] = ref
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if eqn.primitive.name == GRAD_MARKER:
        # identity; remembered so that gradient accumulation can find it
        for var, ref in zip(eqn.outvars, ins):
          env[var] = ref
        self.grad_marked.append(tuple(ins))
        continue
      if eqn.primitive.name == PIPELINE_MARKER:
        for var, ref in zip(eqn.outvars, ins):
          env[var] = ref
        self.pipeline_marks.append((len(self.ops), eqn.params["kind"],
                                    tuple(ins)))
        continue
      if is_boundary_eqn(eqn):
        self.pipeline_marks.append((len(self.ops), PIPELINE_BOUNDARY, ()))
        continue
      if eqn.primitive.name == "optimization_barrier":
        # identity: a scheduling hint for XLA, no layout decision of its own
        for var, ref in zip(eqn.outvars, ins):
          env[var] = ref
        continue
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        outs = self.add_jaxpr(sub[0], sub[1], ins)
        for var, ref in zip(eqn.outvars, outs):
          env[var] = ref
        continue
      out_ids = tuple(self.new_tensor(v.aval) for v in eqn.outvars)
      for var, t in zip(eqn.outvars, out_ids):
        env[var] = t
      in_infos = [self.tensors[i] if isinstance(i, int) else
                  _aval_info(jax.typeof(i.value)) for i in ins]
      out_infos = [self.tensors[t] for t in out_ids]
      op = Op(index=len(self.ops), primitive=eqn.primitive,
              params=dict(eqn.params), inputs=tuple(ins), outputs=out_ids)
      op.flops = op_flops(op.name, op.params, in_infos, out_infos)
      op.bytes_accessed = float(sum(i.nbytes for i in in_infos) +
                                sum(o.nbytes for o in out_infos))
      self.ops.append(op)
    return [read(v) for v in jaxpr.outvars]


def build_graph(closed_jaxpr) -> OpGraph:
  """Flattens a ClosedJaxpr into an OpGraph.

  Args:
    closed_jaxpr: the traced step, e.g. from ``jax.make_jaxpr``.

  Returns:
    The graph with producers, consumers and last uses filled in.
  """
  b = _Builder()
  invars = tuple(b.new_tensor(v.aval) for v in closed_jaxpr.jaxpr.invars)
  outvars = tuple(b.add_jaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, invars))
  return _finish(b.tensors, b.ops, invars, outvars, b.consts,
                 grad_marked=tuple(b.grad_marked),
                 pipeline_marks=tuple(b.pipeline_marks))


def _finish(tensors, ops, invars, outvars, consts, **extra) -> OpGraph:
  producer: dict[int, int] = {}
  consumers: dict[int, list[int]] = {}
  last_use: dict[int, int] = {}
  for pos, op in enumerate(ops):
    for t in op.outputs:
      producer[t] = op.index
    for t in op.inputs:
      if isinstance(t, int):
        consumers.setdefault(t, []).append(op.index)
        last_use[t] = pos
  for t in outvars:
    if isinstance(t, int):
      last_use[t] = len(ops)
  return OpGraph(tensors=tensors, ops=list(ops), invars=tuple(invars),
                 outvars=tuple(outvars), consts=consts, producer=producer,
                 consumers=consumers, last_use=last_use, **extra)


def subgraph(graph: OpGraph, ops: Sequence[Op], outputs: Sequence[int]) -> OpGraph:
  """The graph of a subset of ops (original op indices kept).

  Inputs are the tensors the ops read but do not produce (constants stay
  constants); ``outputs`` are the tensors the subgraph must return.
  """
  produced = {t for op in ops for t in op.outputs}
  invars: dict[int, None] = {}
  consts = {}
  for op in ops:
    for t in op.inputs:
      if isinstance(t, int) and t not in produced:
        if t in graph.consts:
          consts[t] = graph.consts[t]
        else:
          invars[t] = None
  outvars = tuple(outputs)
  for t in outvars:
    if t not in produced and t not in graph.consts:
      invars[t] = None  # passed straight through
  return _finish(graph.tensors, ops, tuple(invars), outvars, consts)


def op_scope(index: int) -> str:
  """The name scope ``evaluate`` gives op ``index`` (see ``hlo_stats``)."""
  return f"op{index}"


def evaluate(graph: OpGraph, args: Sequence[Any], *, on_output=None,
             on_operand=None, ops: Sequence[Op] | None = None,
             env: dict | None = None) -> list[Any]:
  """Runs the graph by binding each primitive (usable inside ``jax.jit``).

  Args:
    graph: the graph to run.
    args: one value per graph input.
    on_output: optional ``fn(tensor_id, value) -> value`` applied to every op
      output (the lowering uses it to insert sharding constraints).
    on_operand: optional ``fn(op, position, tensor_id, value) -> value`` applied
      to every tensor operand just before an op consumes it.
    ops: a subset of ``graph.ops`` to run (default: all, in order).
    env: tensor id -> value, for values already computed; updated in place.

  Returns:
    One value per graph output.
  """
  env = {} if env is None else env
  for t, val in zip(graph.invars, args or ()):
    env.setdefault(t, val)
  for t, val in graph.consts.items():
    env.setdefault(t, val)

  def read(ref):
    return ref.value if isinstance(ref, Literal) else env[ref]

  for op in graph.ops if ops is None else ops:
    # The scope names the op in the compiled HLO's metadata
    # (op_name=".../op12/dot_general"), so that a collective XLA inserts can
    # be traced back to the op whose layout caused it.
    with jax.named_scope(op_scope(op.index)):
      ins = []
      for pos, ref in enumerate(op.inputs):
        val = read(ref)
        if on_operand is not None and isinstance(ref, int):
          val = on_operand(op, pos, ref, val)
        ins.append(val)
      outs = op.primitive.bind(*ins, **op.params)
      if not op.primitive.multiple_results:
        outs = [outs]
      for t, val in zip(op.outputs, outs):
        env[t] = on_output(t, val) if on_output is not None else val
  return [read(ref) if isinstance(ref, Literal) or ref in env else None
          for ref in graph.outvars]
