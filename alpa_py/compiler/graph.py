"""Jaxpr -> OpGraph: a flat list of operations over numbered tensors.

Call-like primitives (``jit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``) are inlined, because a sharding decision inside
them is as free as one outside.

``scan`` is planned through its body. The scan stays one op of
``graph.ops`` (the unit that runs, that pipelines place in a layer and that
gradient accumulation splits around), and its body becomes a ``Region``
(``graph.regions[scan op index]``): the body's ops, flattened like the
step's, over tensors of their own. A body op is an ordinary ``Op`` with
``region`` set to its scan's index and ``trips`` to how often it runs per
step (the product of the trip counts of the scans around it); its index
follows every top-level op's, so ``graph.ops[i].index == i`` still holds.
The region's inputs are explicit body tensors, one per scan operand:
loop-invariant operands (``consts_in``), the carry as one iteration sees it
(``carry_in``) and one slice of each stacked operand (``xs_in``, the stacked
value's shape minus its leading dim); its outputs are body refs, the carry
after one iteration (``carry_out``) and one slice of each stacked result
(``ys_out``). Only the scan op reads or writes outer tensors, so every pass
that walks ``graph.ops`` (layers, accumulation, pipelines) sees the scan as
before; the intra-op pass (``auto_sharding``) and the lowering
(``evaluate``) look inside.

``cond`` (and ``switch``) is planned through its branches the same way:
the cond stays one op, and each branch becomes a ``Branch``
(``graph.branches[cond op index]``) over tensors of its own, one per
operand after the branch index (``invars``). Each branch returns its
results through a ``copy`` op (``outvars``): the intra-op pass ties the
copies of all branches to one layout, the cond's result's, so that a
branch whose own ops prefer another layout is resharded at its output.
A ``while`` (trip count unknown) stays a single op.

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

from alpa_py.compiler.flops import op_flops
from alpa_py.compiler.graph_regions import Branch as Branch
from alpa_py.compiler.graph_regions import Region as Region
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
  # index of the scan (or cond) whose body holds this op (None: a top-level
  # op), and
  # how many times the op runs per step
  region: int | None = None
  trips: int = 1

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
  # scan op index -> its body (nested scans too; see ``Region``)
  regions: dict = dataclasses.field(default_factory=dict)
  # cond op index -> its branches (see ``Branch``)
  branches: dict = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def outvar_set(self) -> frozenset:
    return frozenset(t for t in self.outvars if isinstance(t, int))

  @functools.cached_property
  def fused_bytes(self) -> dict[int, float]:
    """Op index -> the bytes it moves once XLA has fused it with its
    neighbours (``fusion.fused_bytes``)."""
    from alpa_py.compiler import fusion  # fusion reads OpGraph
    return fusion.fused_bytes(self)

  def all_ops(self, ops: Sequence[Op] | None = None):
    """Every op in program order, each scan followed by its body's ops and
    each cond by its branches' ops."""
    for op in self.ops if ops is None else ops:
      yield op
      region = self.regions.get(op.index)
      if region is not None:
        yield from self.all_ops(region.ops)
      for branch in self.branches.get(op.index, ()):
        yield from self.all_ops(branch.ops)

  def bodies(self) -> list:
    """The op lists XLA compiles as computations of their own: the step,
    each scan body and each cond branch."""
    return [self.ops] + [r.ops for r in self.regions.values()] + [
        b.ops for bs in self.branches.values() for b in bs]

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


@dataclasses.dataclass(frozen=True)
class _Barrier:
  """An ``optimization_barrier`` over one value, as ``make_op`` reads an
  equation."""

  primitive: Any = jax.lax.optimization_barrier_p
  params: Any = dataclasses.field(default_factory=dict)


_BARRIER = _Barrier()
# a branch result's copy (see the module docstring), read as an equation
_COPY = _Barrier(primitive=jax.lax.copy_p)


def _prevents_cse(eqn) -> bool:
  """A ``jax.checkpoint`` region recomputed in the backward pass."""
  return eqn.primitive.name in ("remat", "remat2", "checkpoint") and bool(
      eqn.params.get("prevent_cse")) and bool(
          eqn.params.get("differentiated"))


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


@dataclasses.dataclass
class _Scope:
  """Where ``add_jaxpr`` puts ops: the step, or the body of a scan."""

  ops: list
  consts: dict
  scan: Op | None = None  # the enclosing scan or cond (None: top level)
  trips: int = 1


class _Builder:

  def __init__(self):
    self.tensors: list[TensorInfo] = []
    self.ops: list[Op] = []
    self.consts: dict[int, Any] = {}
    self.grad_marked: list[tuple] = []
    self.pipeline_marks: list[tuple] = []
    self.top = _Scope(self.ops, self.consts)
    self.body_ops: list[Op] = []  # every body op, numbered at the end
    self.regions: list[tuple[Op, dict]] = []
    self.conds: list[tuple[Op, list]] = []

  def new_tensor(self, aval) -> int:
    self.tensors.append(_aval_info(aval))
    return len(self.tensors) - 1

  def add_scan(self, eqn, ins, scope: _Scope) -> tuple[int, ...]:
    """The scan op (in ``scope``) and its body as a region."""
    out_ids = tuple(self.new_tensor(v.aval) for v in eqn.outvars)
    op = self.make_op(eqn, ins, out_ids, scope)
    body = eqn.params["jaxpr"]
    length = int(eqn.params["length"])
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    body_in = [self.new_tensor(v.aval) for v in body.jaxpr.invars]
    inner = _Scope([], {}, op, scope.trips * length)
    outs = self.add_jaxpr(body.jaxpr, body.consts, body_in, inner)
    self.regions.append((op, dict(
        length=length, ops=tuple(inner.ops), consts_in=tuple(body_in[:nc]),
        carry_in=tuple(body_in[nc:nc + nk]), xs_in=tuple(body_in[nc + nk:]),
        carry_out=tuple(outs[:nk]), ys_out=tuple(outs[nk:]),
        consts=tuple(inner.consts.items()))))
    return out_ids

  def add_cond(self, eqn, ins, scope: _Scope) -> tuple[int, ...]:
    """The cond op (in ``scope``) and its branches."""
    out_ids = tuple(self.new_tensor(v.aval) for v in eqn.outvars)
    op = self.make_op(eqn, ins, out_ids, scope)
    branches = []
    for closed in eqn.params["branches"]:
      body_in = [self.new_tensor(v.aval) for v in closed.jaxpr.invars]
      inner = _Scope([], {}, op, scope.trips)
      outs = self.add_jaxpr(closed.jaxpr, closed.consts, body_in, inner)
      copies = []
      for ref, var in zip(outs, closed.jaxpr.outvars):
        t = self.new_tensor(var.aval)
        self.make_op(_COPY, [ref], (t,), inner)
        copies.append(t)
      branches.append((op, dict(ops=tuple(inner.ops), invars=tuple(body_in),
                                outvars=tuple(copies),
                                consts=tuple(inner.consts.items()))))
    self.conds.append((op, branches))
    return out_ids

  def make_op(self, eqn, ins, out_ids, scope: _Scope) -> Op:
    in_infos = [self.tensors[i] if isinstance(i, int) else
                _aval_info(jax.typeof(i.value)) for i in ins]
    out_infos = [self.tensors[t] for t in out_ids]
    op = Op(index=len(self.ops) if scope.scan is None else -1,
            primitive=eqn.primitive, params=dict(eqn.params),
            inputs=tuple(ins), outputs=out_ids, trips=scope.trips)
    op.flops = op_flops(op.name, op.params, in_infos, out_infos)
    op.bytes_accessed = float(sum(i.nbytes for i in in_infos) +
                              sum(o.nbytes for o in out_infos))
    if scope.scan is not None:
      op.region = scope.scan  # the Op for now; its index once numbered
      self.body_ops.append(op)
    scope.ops.append(op)
    return op

  def barrier(self, refs, scope: _Scope) -> list:
    """``refs`` through an ``optimization_barrier`` each (literals as they
    are)."""
    out = []
    for ref in refs:
      if isinstance(ref, Literal):
        out.append(ref)
        continue
      t = self.new_tensor(jax.ShapeDtypeStruct(self.tensors[ref].shape,
                                                  self.tensors[ref].dtype))
      self.make_op(_BARRIER, [ref], (t,), scope)
      out.append(t)
    return out

  def number_body_ops(self) -> dict[int, Region]:
    """Numbers body ops after the top-level ones; returns the regions."""
    for k, op in enumerate(self.body_ops):
      op.index = len(self.ops) + k
    for op in self.body_ops:
      op.region = op.region.index
    return {op.index: Region(op=op.index, **fields)
            for op, fields in self.regions}

  def cond_branches(self) -> dict[int, tuple[Branch, ...]]:
    """The conds' branches, by cond op index (after ``number_body_ops``)."""
    return {op.index: tuple(Branch(**fields) for _, fields in branches)
            for op, branches in self.conds}

  def add_jaxpr(self, jaxpr, consts, in_refs, scope: _Scope | None = None
                ) -> list:
    scope = self.top if scope is None else scope
    top = scope.scan is None
    env: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return Literal(v.val)
      return env[v]

    for var, val in zip(jaxpr.constvars, consts):
      t = self.new_tensor(var.aval)
      scope.consts[t] = val
      env[var] = t
    for var, ref in zip(jaxpr.invars, in_refs):
      env[var] = ref
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      if not top and (eqn.primitive.name in (GRAD_MARKER, PIPELINE_MARKER) or
                      is_boundary_eqn(eqn)):
        # markers inside a scan body mark nothing the pipeline can cut at
        for var, ref in zip(eqn.outvars, ins):
          env[var] = ref
        continue
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
        # kept, one op per value (each an identity that follows its
        # operand's layout), so that the lowering keeps it too
        for var, t in zip(eqn.outvars, self.barrier(ins, scope)):
          env[var] = t
        continue
      sub = _sub_jaxpr(eqn)
      if sub is not None and _prevents_cse(eqn):
        # the recomputation of a ``jax.checkpoint`` region in the backward
        # pass: JAX's lowering puts its inputs through a barrier so that XLA
        # cannot merge it back into the forward pass; inlined, it gets the
        # same barriers
        ins = self.barrier(ins, scope)
      if sub is not None:
        outs = self.add_jaxpr(sub[0], sub[1], ins, scope)
        for var, ref in zip(eqn.outvars, outs):
          env[var] = ref
        continue
      if eqn.primitive.name == "scan" and isinstance(
          eqn.params.get("jaxpr"), jcore.ClosedJaxpr):
        out_ids = self.add_scan(eqn, ins, scope)
      elif eqn.primitive.name == "cond" and all(
          isinstance(b, jcore.ClosedJaxpr) for b in eqn.params["branches"]):
        out_ids = self.add_cond(eqn, ins, scope)
      else:
        out_ids = tuple(self.new_tensor(v.aval) for v in eqn.outvars)
        self.make_op(eqn, ins, out_ids, scope)
      for var, t in zip(eqn.outvars, out_ids):
        env[var] = t
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
                 pipeline_marks=tuple(b.pipeline_marks),
                 regions=b.number_body_ops(), branches=b.cond_branches())


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
  return _finish(graph.tensors, ops, tuple(invars), outvars, consts,
                 regions=graph.regions, branches=graph.branches)
