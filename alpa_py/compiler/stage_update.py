"""Splitting the optimizer update by pipeline stage.

The update (the ops after the gradient marker, and the batch-independent ops
they need) runs once per step on the accumulated values. Run as one program
on the whole mesh, it pulls every parameter and gradient off its stage's
submesh and sends every new parameter back, every step. ``split_update``
assigns each update op to the stage whose values it reads instead, so that
each stage updates its own parameters and optimizer state on its own
submesh, where they then stay:

* An accumulated value belongs to the stage that produced it. An op belongs
  to the one stage whose values it reads; an op that reads no stage's value
  (a step count, ``0.9 * momentum``) is *free*: it runs in every program
  that reads its result (a step input it reads, e.g. the momentum, then
  lives with that program). A parameter thus goes to the stage that
  computes its gradient: a parameter read by several stages' forwards (a
  tied embedding) has one gradient, summed in one stage's backward from the
  others' contributions, and that stage owns it.
* An op that reads several stages' values (or one stage's and a combined
  one) and makes a small value (at most ``SMALL_BYTES``; a sum of
  squared-gradient norms, a finite check of a loss scale) from small values
  is a *cross-stage reduction*: each stage's partial program computes its
  small inputs, one combine program (on the last stage's submesh) computes
  the op and the free ops it needs, and the combined values go to every
  stage's update.
* Anything else that crosses stages (an op reading several stages' large
  values, a large step input read by two stages' updates, a reduction whose
  inputs depend on another reduction's result) has no cheap stage-local
  form: ``split_update`` returns the reason and the caller keeps the
  whole-mesh update.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alpa_py.compiler.graph import OpGraph
from alpa_py.compiler.pipeline_program import SMALL_BYTES

_COMBINE = -1  # the destination "the combine program" in ``_needs``


@dataclasses.dataclass(frozen=True)
class UpdateSplit:
  """The update cut by stage.

  Attributes:
    stage_ops: per stage, the op indices of its update program, in order.
    partial_ops: per stage, the op indices of its partial program.
    partials: per stage, the small tensors its partial program hands to the
      combine program (accumulated values included).
    combine_ops: op indices of the combine program.
    combined: tensors the combine program hands to the stages' updates.
    combine_stage: the stage on whose submesh the combine runs.
    outputs: per stage, the step outputs its update returns; ``-1``: the
      combine's.
    owner: stage of each step input the stages' updates read.
  """

  stage_ops: tuple[tuple[int, ...], ...]
  partial_ops: tuple[tuple[int, ...], ...]
  partials: tuple[tuple[int, ...], ...]
  combine_ops: tuple[int, ...]
  combined: tuple[int, ...]
  combine_stage: int
  outputs: tuple[tuple[int, tuple[int, ...]], ...]
  owner: tuple[tuple[int, int], ...]

  def outputs_of(self, program: int) -> tuple[int, ...]:
    """The step outputs stage ``program``'s update returns (-1: the
    combine's)."""
    return dict(self.outputs).get(program, ())

  def owner_of(self, t: int) -> int | None:
    """The stage whose update reads step input ``t``."""
    return dict(self.owner).get(t)


def _small(graph: OpGraph, t: int) -> bool:
  return graph.tensor(t).nbytes <= SMALL_BYTES


def _ints(refs) -> list[int]:
  return [t for t in refs if isinstance(t, int)]


def split_update(graph: OpGraph, ops: Sequence, acc_stage: Mapping[int, int],
                 num_stages: int, outputs: Sequence[int],
                 homes: Mapping[int, int] | None = None,
                 name=lambda t: f"%{t}") -> UpdateSplit | str:
  """Assigns the update's ops to stages (module doc).

  Args:
    graph: the step's graph.
    ops: the update's ops, in program order.
    acc_stage: each accumulated tensor the update reads -> its stage.
    num_stages: number of stages.
    outputs: the step's outputs (tensor ids).
    homes: step output -> the stage that reads it next step (a new
      parameter: the stage whose forward reads the parameter); a free op
      making it runs there.
    name: readable name of a tensor, for the reason.

  Returns:
    The split, or why the update cannot run stage by stage.
  """
  homes = homes or {}
  index = {op.index: op for op in ops}
  label: dict[int, frozenset] = {t: frozenset([s])
                                 for t, s in acc_stage.items()}
  kind: dict[int, object] = {}  # op -> stage, None (free) or _COMBINE
  after_combine: set = set()  # tensors that depend on a combined value
  for op in ops:
    ins = _ints(op.inputs)
    lab = frozenset().union(*(label.get(t, frozenset()) for t in ins))
    real = lab - {_COMBINE}
    small = all(_small(graph, t) for t in ins + list(op.outputs))
    late = any(t in after_combine for t in ins)
    if len(real) > 1 or (real and _COMBINE in lab and small):
      if not small:
        t = next(t for t in ins + list(op.outputs) if not _small(graph, t))
        return (f"update op `{op.name}` #{op.index} combines the values of "
                f"stages {sorted(real)} and reads or makes "
                f"{name(t)} ({graph.tensor(t).dtype}"
                f"{list(graph.tensor(t).shape)}), more than a small value "
                f"(<= {SMALL_BYTES} bytes) to send between stages")
      if any(t in after_combine and label.get(t) and
             _COMBINE not in label[t] for t in ins):
        return (f"update op `{op.name}` #{op.index} reduces across stages "
                "values that depend on an earlier cross-stage reduction "
                "(two rounds of reduction)")
      kind[op.index] = _COMBINE
      out_label, late = frozenset([_COMBINE]), True
    elif real:
      (kind[op.index],) = real
      out_label, late = real, late or _COMBINE in lab
    else:  # reads no stage's value: runs where its result is read
      kind[op.index] = None
      out_label = lab
    for t in op.outputs:
      label[t] = out_label
    if late:
      after_combine.update(op.outputs)

  # where each op's results are needed: stages, or the combine (free ops run
  # in every program that reads them)
  consumers = {t: [c for c in graph.consumers.get(t, ()) if c in index]
               for op in ops for t in op.outputs}
  out_set = set(outputs)
  needs: dict[int, set] = {}
  for op in reversed(ops):
    k = kind[op.index]
    if k is not None:
      needs[op.index] = {k}
      continue
    need: set = set()
    for t in op.outputs:
      for c in consumers[t]:
        need |= needs[c]
      if t in homes:
        need.add(homes[t])
    if not need and out_set & set(op.outputs):
      need = {0}  # e.g. the new step count: kept with stage 0
    needs[op.index] = need

  stage_ops = [[] for _ in range(num_stages)]
  combine_ops = []
  for op in ops:
    for d in sorted(needs[op.index], key=lambda d: (d == _COMBINE, d)):
      (combine_ops if d == _COMBINE else stage_ops[d]).append(op.index)

  def produced(op_ids):
    return {t for i in op_ids for t in index[i].outputs}

  # the combine's inputs each come from one stage's partial program
  made = [produced(o) for o in stage_ops]
  combine_made = produced(combine_ops)
  partials = [[] for _ in range(num_stages)]
  for i in combine_ops:
    for t in _ints(index[i].inputs):
      if t in combine_made or not label.get(t, frozenset()) - {_COMBINE}:
        continue
      (s,) = label[t]
      if t not in partials[s]:
        partials[s].append(t)
  partial_ops = []
  for s in range(num_stages):
    need, keep = set(partials[s]), set()
    for i in reversed(stage_ops[s]):
      if need & set(index[i].outputs):
        keep.add(i)
        need |= set(_ints(index[i].inputs))
    partial_ops.append(tuple(i for i in stage_ops[s] if i in keep))

  # every step output comes from one program
  outs: dict[int, list] = {}
  for t in dict.fromkeys(outputs):
    makers = [s for s in range(num_stages) if t in made[s]]
    if makers:
      home = homes.get(t) if homes.get(t) in makers else makers[0]
    elif t in combine_made:
      home = _COMBINE
    elif t in acc_stage:
      continue  # the accumulator itself is the output
    else:
      home = 0  # a step input returned as it is
    outs.setdefault(home, []).append(t)

  # the combined values each stage reads
  combined = sorted({t for s in range(num_stages) for i in stage_ops[s]
                     for t in _ints(index[i].inputs)
                     if t in combine_made and t not in made[s]})

  # step inputs: a large one read by two programs would cross every step
  readers: dict[int, set] = {}
  for s, op_ids in enumerate(stage_ops):
    for i in op_ids:
      for t in _ints(index[i].inputs):
        if t not in label and graph.producer.get(t) not in index:
          readers.setdefault(t, set()).add(s)
  for i in combine_ops:
    for t in _ints(index[i].inputs):
      if t not in label and graph.producer.get(t) not in index:
        readers.setdefault(t, set()).add(_COMBINE)
  for t, rs in readers.items():
    if len(rs) > 1 and not _small(graph, t) and t not in graph.consts:
      where = ", ".join("the combine" if r == _COMBINE else f"stage {r}"
                        for r in sorted(rs))
      return (f"{name(t)} ({graph.tensor(t).dtype}"
              f"{list(graph.tensor(t).shape)}) is read by the updates of "
              f"{where}: it would cross stages every step")
  owner = {t: min(rs) for t, rs in readers.items() if min(rs) >= 0}
  return UpdateSplit(
      stage_ops=tuple(tuple(o) for o in stage_ops),
      partial_ops=tuple(partial_ops),
      partials=tuple(tuple(p) for p in partials),
      combine_ops=tuple(combine_ops), combined=tuple(combined),
      combine_stage=num_stages - 1,
      outputs=tuple(sorted((k, tuple(v)) for k, v in outs.items())),
      owner=tuple(sorted(owner.items())))
