"""Compiling a stage-local optimizer update (``compiler/stage_update.py``).

Each stage's update program runs on the stage's submesh; it reads each
parameter in the layout the stage's forward and backward read it, and
returns the new parameter (and optimizer state) in the layout it read, so
that the next step finds them in place. Where the update reduces values of
several stages, each stage's partial program and one combine program (on
the last stage's submesh) run first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from alpa_py.compiler.auto_sharding import run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.graph import OpGraph, subgraph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.lowering import (constraint_hooks, io_shardings,
                                       tensor_spec)
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.pipeline_program import StageProgram
from alpa_py.compiler.program import Task
from alpa_py.compiler.stage_update import UpdateSplit, split_update
from alpa_py.compiler.strategies.spec import replicated


@dataclasses.dataclass(frozen=True)
class LocalUpdate:
  """The compiled stage-local update.

  Attributes:
    stages: the stage programs with their ``update`` / ``partial`` set.
    combine: the cross-stage reduction, if the update has one.
    combine_stage: the stage whose submesh runs ``combine``.
    notes: what the plan prints about the update.
  """

  stages: tuple[StageProgram, ...]
  combine: Task | None
  combine_stage: int
  notes: tuple[str, ...]


def _program_fn(g: OpGraph, hooks=(None, None)) -> Callable:
  on_output, on_operand = hooks

  def fn(*args):
    env = dict(zip(g.invars, args))
    evaluate(g, None, on_output=on_output, on_operand=on_operand, env=env)
    return tuple(env[t] for t in g.outvars)

  return fn


def _compile(g: OpGraph, fn, ins, outs) -> Task:
  sds = [jax.ShapeDtypeStruct(g.tensor(t).shape, g.tensor(t).dtype,
                              sharding=s) for t, s in zip(g.invars, ins)]
  return Task.compile(fn, sds, g.invars, g.outvars, ins, outs,
                      local_devices=True)


class _Layouts:
  """Where the stages' programs hold each value the update reads."""

  def __init__(self, stages: Sequence[StageProgram], acc_stage: dict):
    self.stages, self.acc_stage = stages, acc_stage

  def accumulated(self, t: int):
    st = self.stages[self.acc_stage[t]]
    if st.reduce is not None and t in st.reduce.out_ids:
      return st.reduce.out_shardings[st.reduce.out_ids.index(t)]
    for task in (st.backward, st.forward):
      if t in task.out_ids:
        return task.out_shardings[task.out_ids.index(t)]
    raise AssertionError(f"%{t} is accumulated by no program of stage "
                         f"{st.index}")

  def read_by(self, t: int, s: int):
    """The layout stage ``s``'s forward or backward reads step input ``t``
    in (None: it reads no such input)."""
    st = self.stages[s]
    for task in (st.forward, st.backward):
      if t in task.in_ids:
        return task.in_shardings[task.in_ids.index(t)]
    return None

  def known(self, t: int, s: int):
    if t in self.acc_stage:
      return self.accumulated(t) if self.acc_stage[t] == s else None
    return self.read_by(t, s)


def _replicated(mesh, g: OpGraph, ts):
  return [NamedSharding(mesh, PartitionSpec()) for _ in ts]


def _small_program(g: OpGraph, mesh, layouts: _Layouts, s: int) -> Task:
  """A partial or combine program: inputs where they are, outputs
  replicated (they are small)."""
  ins = [layouts.known(t, s) or NamedSharding(mesh, PartitionSpec())
         for t in g.invars]
  return _compile(g, _program_fn(g), ins, _replicated(mesh, g, g.outvars))


def _update_program(g: OpGraph, s: int, solved, layouts: _Layouts, aliases,
                    option: AutoShardingOption) -> Task:
  """Stage ``s``'s update on its submesh, parameters and optimizer state
  returned in the layout they are read in."""
  sol_s, joint, mesh = solved[s]
  specs = {}
  for i, t in enumerate(g.invars):
    if t in layouts.acc_stage and layouts.acc_stage[t] == s:
      st = layouts.stages[s]
      specs[i] = [replicated(len(g.tensor(t).shape))
                  if st.reduce is not None and t in st.reduce.out_ids
                  else tensor_spec(joint, sol_s, t)]
    elif t in joint.invars and t not in layouts.acc_stage:
      specs[i] = [tensor_spec(joint, sol_s, t)]
  inputs, outputs = set(g.invars), set(g.outvars)
  pairs = [(o, i) for o, i in aliases.items() if i in inputs and o in outputs]
  logical = LogicalMesh(tuple(mesh.devices.shape),
                        get_profile(option.cost_profile))
  sol = run_auto_sharding(g, logical, option, input_specs=specs, aliases=pairs)
  ins, outs = io_shardings(g, sol, mesh)
  for i, t in enumerate(g.invars):
    ins[i] = layouts.known(t, s) or ins[i]
  in_of = dict(zip(g.invars, ins))
  for j, t in enumerate(g.outvars):
    p = aliases.get(t)
    if p in in_of:  # the next step reads it where this one did
      outs[j] = in_of[p]
    elif p is not None and layouts.read_by(p, s) is not None:
      outs[j] = layouts.read_by(p, s)
  return _compile(g, _program_fn(g, constraint_hooks(g, sol, mesh)), ins, outs)


def _notes(split: UpdateSplit, stages, graph: OpGraph, per_step, name) -> tuple:
  notes = ["stage-local update: each stage updates its own parameters and "
           "optimizer state on its submesh ("
           + "; ".join(f"stage {s}: {len(ops)} ops"
                       for s, ops in enumerate(split.stage_ops)) + ")"]
  if split.combine_ops:
    notes.append(
        f"cross-stage reduction: {len(split.combine_ops)} ops combine "
        + ", ".join(f"{len(p)} partial(s) of stage {s}"
                    for s, p in enumerate(split.partials) if p)
        + f" on stage {split.combine_stage}'s submesh; "
        f"{len(split.combined)} combined value(s) go back to every stage")
  for t in sorted(per_step):
    readers = sorted(st.index for st in stages
                     if t in st.forward.in_ids or t in st.backward.in_ids)
    owner = split.owner_of(t)
    if owner is not None and set(readers) - {owner}:
      others = sorted(set(readers) - {owner})
      notes.append(f"{name(t)} is read by stages {readers}: stage {owner} "
                   f"owns and updates it (its gradient is summed there); "
                   f"stage(s) {others} receive it every step")
  return tuple(notes)


def stage_local_update(traced, ops: Sequence, averaged: set,
                       stages: Sequence[StageProgram], solved,
                       option: AutoShardingOption, names: dict,
                       batch_ids: Sequence[int]) -> LocalUpdate | str:
  """Compiles the update stage by stage, or says why it cannot be.

  Args:
    traced: the traced step.
    ops: the update's ops, in program order.
    averaged: the accumulated tensors the stages produce.
    stages: the compiled stages.
    solved: per stage, (intra-op solution, joint graph, mesh).
    option: the intra-op options.
    names: tensor id -> readable name of the step inputs.
    batch_ids: the step inputs split into micro-batches.

  Returns:
    The ``LocalUpdate``, or the reason the update stays on the whole mesh.
  """
  graph = traced.graph
  acc_stage: dict = {}
  for st in stages:
    for task in (st.forward, st.backward):
      for t in task.out_ids:
        if t in averaged:
          acc_stage.setdefault(t, st.index)

  def name(t):
    return names.get(t, f"%{t}")

  out_ids = [t for t in graph.outvars if isinstance(t, int)]
  homes = {}
  for o, i in traced.graph_aliases:
    readers = [st.index for st in stages
               if i in st.forward.in_ids or i in st.backward.in_ids]
    if readers:
      homes[o] = readers[0]
  split = split_update(graph, ops, acc_stage, len(stages), out_ids, homes,
                       name)
  if isinstance(split, str):
    return split
  by_index = {op.index: op for op in ops}
  layouts = _Layouts(stages, acc_stage)
  aliases = dict(traced.graph_aliases)
  new_stages = []
  for s, st in enumerate(stages):
    mesh = solved[s][2]
    update = partial = None
    outs = split.outputs_of(s)
    if outs:
      g = subgraph(graph, [by_index[i] for i in split.stage_ops[s]], outs)
      update = _update_program(g, s, solved, layouts, aliases, option)
    made = [t for t in split.partials[s] if t not in acc_stage]
    if made:
      g = subgraph(graph, [by_index[i] for i in split.partial_ops[s]], made)
      partial = _small_program(g, mesh, layouts, s)
    new_stages.append(dataclasses.replace(st, update=update, partial=partial))
  combine = None
  if split.combine_ops:
    c = split.combine_stage
    g = subgraph(graph, [by_index[i] for i in split.combine_ops],
                 tuple(split.combined) + split.outputs_of(-1))
    combine = _small_program(g, solved[c][2], layouts, c)
  per_step = set(graph.invars) - set(batch_ids)
  return LocalUpdate(tuple(new_stages), combine, split.combine_stage,
                     _notes(split, stages, graph, per_step, name))
