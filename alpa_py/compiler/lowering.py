"""Solution -> a jittable function with sharding constraints.

The step is re-run from the flattened graph, binding each primitive; the
outputs of every ILP node's root op get ``with_sharding_constraint`` to the
chosen spec, and an operand that an op needs in another layout than its
producer's is constrained right before that op. Inputs and outputs get
``NamedSharding``s. XLA's SPMD partitioner then inserts the collectives.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding

from alpa_py.compiler.auto_sharding import ShardingSolution
from alpa_py.compiler.graph import Literal, OpGraph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.strategies.spec import replicated, to_partition_spec

def named_sharding(mesh: Mesh, spec) -> NamedSharding:
  return NamedSharding(mesh, to_partition_spec(spec, mesh.axis_names))


def tensor_spec(graph: OpGraph, solution: ShardingSolution, ref):
  if isinstance(ref, Literal):
    return replicated(len(getattr(ref.value, "shape", ())))
  spec = solution.spec_of.get(ref)
  return spec if spec is not None else replicated(len(graph.tensor(ref).shape))


def constraint_hooks(graph: OpGraph, solution: ShardingSolution, mesh: Mesh):
  """The ``on_output`` / ``on_operand`` hooks for ``graph.evaluate``."""
  constrained = set(solution.constrained)
  spec_of = solution.spec_of
  operand_spec = solution.operand_spec_of
  cache: dict = {}

  def sharding(spec):
    s = cache.get(spec)
    if s is None:
      s = cache[spec] = named_sharding(mesh, spec)
    return s

  def on_output(t, val):
    if t in constrained and graph.tensor(t).shape:
      return jax.lax.with_sharding_constraint(val, sharding(spec_of[t]))
    return val

  def on_operand(op, pos, t, val):
    spec = operand_spec.get((op.index, pos))
    if spec is not None and graph.tensor(t).shape:
      return jax.lax.with_sharding_constraint(val, sharding(spec))
    return val

  return on_output, on_operand


def make_step_fn(graph: OpGraph, solution: ShardingSolution,
                 mesh: Mesh) -> Callable:
  """A function of the flat inputs returning the flat outputs, constrained."""
  on_output, on_operand = constraint_hooks(graph, solution, mesh)

  def step(*flat_args):
    return tuple(evaluate(graph, flat_args, on_output=on_output,
                          on_operand=on_operand))

  return step


def io_shardings(graph: OpGraph, solution: ShardingSolution, mesh: Mesh):
  """NamedShardings of the graph's inputs and outputs."""
  ins = [named_sharding(mesh, tensor_spec(graph, solution, t))
         for t in graph.invars]
  outs = [named_sharding(mesh, tensor_spec(graph, solution, t))
          for t in graph.outvars]
  return ins, outs
