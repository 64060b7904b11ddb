"""Running an ``OpGraph``: every op re-bound as a JAX primitive (inside
``jax.jit``), a scan with a planned body rebuilt as ``jax.lax.scan`` over its
region's ops, a cond with planned branches as ``jax.lax.switch`` over theirs;
the lowering's sharding constraints are applied through hooks.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from alpa_py.compiler.graph import Branch, Literal, Op, OpGraph, Region


def op_scope(index: int) -> str:
  """The name scope ``evaluate`` gives op ``index`` (see ``hlo_stats``)."""
  return f"op{index}"


def evaluate(graph: OpGraph, args: Sequence[Any], *, on_output=None,
             on_operand=None, ops: Sequence[Op] | None = None,
             env: dict | None = None) -> list[Any]:
  """Runs the graph by binding each primitive (usable inside ``jax.jit``).

  A scan with a region runs as ``jax.lax.scan`` over a body that evaluates
  the region's ops with the same hooks, so that constraints sit inside the
  loop; the hooks also see the region's input tensors (``on_output``) at
  the start of each iteration.

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
  _run_ops(graph, graph.ops if ops is None else ops, env, on_output,
           on_operand)
  return [_read(env, ref) if isinstance(ref, Literal) or ref in env else None
          for ref in graph.outvars]


def _read(env, ref):
  return ref.value if isinstance(ref, Literal) else env[ref]


def _run_ops(graph: OpGraph, ops, env, on_output, on_operand) -> None:
  for op in ops:
    # The scope names the op in the compiled HLO's metadata
    # (op_name=".../op12/dot_general"), so that a collective XLA inserts can
    # be traced back to the op whose layout caused it.
    with jax.named_scope(op_scope(op.index)):
      ins = []
      for pos, ref in enumerate(op.inputs):
        val = _read(env, ref)
        if on_operand is not None and isinstance(ref, int):
          val = on_operand(op, pos, ref, val)
        ins.append(val)
      region = graph.regions.get(op.index)
      branches = graph.branches.get(op.index)
      if region is not None:
        outs = _run_scan(graph, op, region, ins, on_output, on_operand)
      elif branches is not None:
        outs = _run_cond(graph, branches, ins, on_output, on_operand)
      else:
        outs = op.primitive.bind(*ins, **op.params)
        if not op.primitive.multiple_results:
          outs = [outs]
      for t, val in zip(op.outputs, outs):
        env[t] = on_output(t, val) if on_output is not None else val


def _run_scan(graph: OpGraph, op: Op, region: Region, ins, on_output,
              on_operand) -> list:
  """``jax.lax.scan`` over the region's ops (the scan's params kept)."""
  nc, nk = len(region.consts_in), len(region.carry_in)
  consts, init, xs = ins[:nc], list(ins[nc:nc + nk]), list(ins[nc + nk:])

  def hook(t, val):
    return on_output(t, val) if on_output is not None else val

  def body(carry, x):
    env = dict(region.consts)
    for t, val in zip(region.invars, list(consts) + list(carry) + list(x)):
      env[t] = hook(t, val)
    _run_ops(graph, region.ops, env, on_output, on_operand)
    return ([_read(env, r) for r in region.carry_out],
            [_read(env, r) for r in region.ys_out])

  carry, ys = jax.lax.scan(
      body, init, xs, length=region.length,
      reverse=op.params.get("reverse", False),
      unroll=op.params.get("unroll", 1),
      _split_transpose=op.params.get("_split_transpose", False))
  return list(carry) + list(ys)


def _run_cond(graph: OpGraph, branches: Sequence[Branch], ins, on_output,
              on_operand) -> list:
  """``jax.lax.switch`` over the branches' ops (operand 0 is the index)."""

  def hook(t, val):
    return on_output(t, val) if on_output is not None else val

  def make(branch: Branch):
    def run(*operands):
      env = dict(branch.consts)
      for t, val in zip(branch.invars, operands):
        env[t] = hook(t, val)
      _run_ops(graph, branch.ops, env, on_output, on_operand)
      return [_read(env, r) for r in branch.outvars]
    return run

  return list(jax.lax.switch(ins[0], [make(b) for b in branches], *ins[1:]))
