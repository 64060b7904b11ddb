"""Gradient accumulation over micro-batches (``num_micro_batches``).

The step is traced on one micro-batch. Its ops split three ways around the
values marked by ``alpa_py.grad`` / ``value_and_grad``:

* pre:  ops that use neither the batch nor the marked values (run once),
* body: ops that use the batch (run per micro-batch inside ``lax.scan``),
* post: ops that use the marked values (the optimizer update, run once on the
  averaged values).

A batch-dependent value that reaches the post part or the outputs without
passing through the marker has no single correct value over micro-batches:
that is an error naming the op.

Micro-batch ``i`` takes rows ``i, i + n, i + 2n, ...`` of every batch argument
(a split along dim 0 that keeps each device's rows local when dim 0 is
sharded); for a loss averaged over the batch the mean of micro-batch
gradients equals the full-batch gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from alpa_py.compiler.auto_sharding import ShardingSolution
from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.lowering import (constraint_hooks, named_sharding,
                                       tensor_spec)


@dataclasses.dataclass(frozen=True)
class Partition:
  pre: tuple
  body: tuple
  post: tuple
  marked: tuple[int, ...]


def partition(graph: OpGraph, batch_inputs: set[int],
              num_micro_batches: int, out_names=None) -> Partition:
  """Splits the graph's ops into pre / body / post (see module doc).

  Raises:
    ValueError: no marker, or a batch-dependent value escapes the marker.
  """
  marked = tuple(dict.fromkeys(
      r for refs in graph.grad_marked for r in refs if isinstance(r, int)))
  if not marked:
    raise ValueError(
        f"num_micro_batches (={num_micro_batches}) needs the step's gradients "
        "marked: compute them with alpa_py.grad or alpa_py.value_and_grad "
        "(drop-in replacements for jax.grad / jax.value_and_grad)")
  marked_set = set(marked)
  tainted = {graph.invars[i] for i in batch_inputs}
  after = set(marked_set)  # depends on a marked value
  pre, body, post = [], [], []
  for op in graph.ops:
    ins = [t for t in op.inputs if isinstance(t, int)]
    if any(t in tainted and t not in marked_set for t in ins):
      body.append(op)
      tainted.update(op.outputs)
    elif any(t in after for t in ins):
      post.append(op)
      after.update(op.outputs)
    else:
      pre.append(op)
  escaped = tainted - marked_set - {graph.invars[i] for i in batch_inputs}
  for op in post:
    for t in op.inputs:
      if isinstance(t, int) and t in escaped:
        raise ValueError(
            f"with num_micro_batches (={num_micro_batches}), op #{op.index} "
            f"`{op.name}` in the update uses a batch-dependent value that is "
            "not returned through alpa_py.grad / value_and_grad, so it has no "
            "single value over micro-batches; return it as `aux` "
            "(has_aux=True) or compute it from the marked values")
  for k, t in enumerate(graph.outvars):
    if isinstance(t, int) and t in escaped:
      raise ValueError(
          f"with num_micro_batches (={num_micro_batches}), output "
          f"{out_names[k] if out_names else k} depends "
          "on the batch without passing through alpa_py.grad / value_and_grad;"
          " return it as `aux` (has_aux=True) so that it is averaged")
  return Partition(tuple(pre), tuple(body), tuple(post), marked)


def micro_batch_shapes(leaves, owners, batch_argnums, paths, n):
  """Per flat input, its shape inside one micro-batch (checks divisibility)."""
  shapes = []
  for leaf, owner, path in zip(leaves, owners, paths):
    shape = tuple(leaf.shape)
    if owner in batch_argnums:
      if not shape or shape[0] % n:
        raise ValueError(
            f"num_micro_batches (={n}) must divide the batch size: {path} has "
            f"shape {shape}, dim 0 (={shape[0] if shape else 'none'}) is not "
            f"divisible by {n}")
      shape = (shape[0] // n,) + shape[1:]
    shapes.append(shape)
  return shapes


def make_accumulating_fn(graph: OpGraph, solution: ShardingSolution, mesh,
                         part: Partition, batch_inputs: set[int], n: int):
  """A step function running the body once per micro-batch under ``scan``."""
  on_output, on_operand = constraint_hooks(graph, solution, mesh)
  batch_ids = [graph.invars[i] for i in sorted(batch_inputs)]

  def spec(t):
    return tensor_spec(graph, solution, t)

  def step(*flat_args):
    env = dict(zip(graph.invars, flat_args))
    for t, val in graph.consts.items():
      env[t] = val
    evaluate(graph, None, on_output=on_output, on_operand=on_operand,
             ops=part.pre, env=env)
    xs = []
    for t in batch_ids:
      x = env[t]
      mb = x.shape[0] // n
      x = jnp.moveaxis(x.reshape((mb, n) + x.shape[1:]), 1, 0)
      xs.append(jax.lax.with_sharding_constraint(
          x, named_sharding(mesh, ((),) + spec(t))))

    def body(acc, xs_i):
      env_i = dict(env)
      env_i.update(zip(batch_ids, xs_i))
      evaluate(graph, None, on_output=on_output, on_operand=on_operand,
               ops=part.body, env=env_i)
      return [a + env_i[t].astype(a.dtype) for a, t in zip(acc, part.marked)], None

    acc0 = []
    for t in part.marked:
      info = graph.tensor(t)
      zero = jnp.zeros(info.shape, info.dtype)
      if info.shape:
        zero = jax.lax.with_sharding_constraint(zero,
                                                named_sharding(mesh, spec(t)))
      acc0.append(zero)
    acc, _ = jax.lax.scan(body, acc0, xs)
    for t, a in zip(part.marked, acc):
      env[t] = a / n if jnp.issubdtype(a.dtype, jnp.inexact) else a
    evaluate(graph, None, on_output=on_output, on_operand=on_operand,
             ops=part.post, env=env)
    return tuple(r.value if isinstance(r, Literal) else env[r]
                 for r in graph.outvars)

  return step
