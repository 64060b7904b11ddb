"""The program of a pipelined step: what the compiler emits, what every
runtime interprets.

The schedule's clock table becomes an instruction list: RECV moves a tensor
(a step input, this micro-batch's slice of the batch, or another task's
output) into a task's submesh and layout; RUN runs a stage's compiled forward
or backward program; ACC adds a marked value (gradient, loss) into its
accumulator; FREE drops a micro-batch tensor after its last reader; REDUCE
runs a stage's reduce program on its accumulators once its last backward has
run (data-parallel stages that keep per-device partial gradients, see
``compiler/deferred_reduction.py``); AVG marks an accumulated value complete:
it becomes its mean over micro-batches (inexact dtypes) and is offered to its
readers.

The update follows, in the same instructions (RECV with no micro-batch,
then UPDATE runs the program). With a stage-local update
(``compiler/stage_update.py``) each stage runs its own update program ("U")
on its own submesh, so parameters and optimizer state stay there between
steps; where the update combines values of several stages (a global
gradient norm), each stage first runs a partial program ("P") whose small
results the combine program ("C", on one stage's submesh) reduces, and
every "U" reads the combined values. Otherwise one whole-mesh update
program ("G", stage -1) runs on every accumulated value.

``PipelineProgram`` is a frozen value: the local runtime and the Ray runtime
run it with the same interpreter (``runtime/pipeline_interpreter.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Sequence

from alpa_py.compiler.program import Task


class Instr(enum.Enum):
  """Instruction kinds of a pipelined step."""

  RECV = "recv"  # bring a tensor into a task's submesh and layout
  RUN = "run"  # run a stage's forward or backward program
  ACC = "acc"  # add a marked output into its accumulator
  FREE = "free"  # drop a micro-batch tensor after its last use
  REDUCE = "red"  # reduce a stage's stacked per-device accumulators
  AVG = "avg"  # an accumulator is complete: take its mean, offer it
  UPDATE = "upd"  # run an update program (P, C, U, G) once per step


# Task kinds of the update, run once per step (``micro_batch`` None).
PARTIAL = "P"  # a stage's partials of a cross-stage reduction
COMBINE = "C"  # the cross-stage reduction, on ``combine_stage``'s submesh
UPDATE = "U"  # a stage's own update, on its submesh
GLOBAL = "G"  # the whole-mesh update (stage -1)
UPDATE_KINDS = (PARTIAL, COMBINE, UPDATE, GLOBAL)

# At most this many bytes: a value the update may move between stages every
# step (a partial norm, a loss scale, a step count).
SMALL_BYTES = 64


class TensorKind(str, enum.Enum):
  """What a tensor crossing a stage boundary is (``RunStats``)."""

  ACTIVATION = "activation"
  ACTIVATION_GRADIENT = "activation-gradient"
  PARAMETER = "parameter"
  GRADIENT = "gradient"
  SCALAR = "scalar"


class TaskKind(str, enum.Enum):
  """A stage's two programs."""

  FORWARD = "F"
  BACKWARD = "B"


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One step of the program.

  ``micro_batch`` is None for per-step values (parameters), which are moved
  to a stage once per step and reused by every micro-batch.
  """

  kind: Instr
  stage: int
  task: str  # "F" or "B"
  micro_batch: int | None
  tensor: int | None = None

  def __str__(self) -> str:
    mb = "*" if self.micro_batch is None else self.micro_batch
    t = "" if self.tensor is None else f" %{self.tensor}"
    stage = "" if self.stage < 0 else self.stage
    return f"{self.kind.value:<4} {self.task}{stage}.{mb}{t}"


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """One stage: its two programs, its devices and, where its backward keeps
  per-device partial gradients, the program that reduces them once per step
  (``reduce``, task kind "R"); with a stage-local update, its update
  program ("U") and the partials it contributes to a cross-stage reduction
  ("P")."""

  index: int
  forward: Task
  backward: Task
  device_ids: tuple[int, ...]
  logical_shape: tuple[int, ...]
  reduce: Task | None = None
  update: Task | None = None
  partial: Task | None = None

  def task(self, kind: str) -> Task:
    if kind == "R":
      return self.reduce
    if kind == UPDATE:
      return self.update
    if kind == PARTIAL:
      return self.partial
    return self.forward if kind == TaskKind.FORWARD else self.backward

  def tasks(self) -> dict[str, Task]:
    """Kind -> each program the stage has."""
    out = {"F": self.forward, "B": self.backward, "R": self.reduce,
           UPDATE: self.update, PARTIAL: self.partial}
    return {k: v for k, v in out.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class PipelineProgram:
  """A pipelined step, ready to run.

  Attributes:
    stages: the stages, in pipeline order.
    update: the whole-mesh optimizer update ("G"), or None where every
      stage updates its own parameters ("U").
    instructions: the program (RECV / RUN / ACC / FREE / REDUCE / AVG /
      UPDATE).
    invar_ids: tensor id of each flat step input.
    batch_ids: the step inputs split into micro-batches.
    accumulated: marked tensors accumulated over micro-batches (the update
      reads their mean where they are inexact).
    num_micro_batches: micro-batches per step.
    out_ids: the step's flat outputs (default: the update's outputs).
    combine: the cross-stage reduction of a stage-local update, if any.
    combine_stage: the stage on whose submesh ``combine`` runs.
  """

  stages: tuple[StageProgram, ...]
  update: Task | None
  instructions: tuple[Instruction, ...]
  invar_ids: tuple[int, ...]
  batch_ids: tuple[int, ...]
  accumulated: tuple[int, ...]
  num_micro_batches: int
  out_ids: tuple[int, ...] = ()
  combine: Task | None = None
  combine_stage: int = -1

  def task(self, stage: int, kind: str) -> Task:
    if kind == GLOBAL:
      return self.update
    if kind == COMBINE:
      return self.combine
    return self.stages[stage].task(kind)

  @property
  def outputs(self) -> tuple[int, ...]:
    """Tensor id of each flat step output."""
    return self.out_ids or self.update.out_ids

  def all_tasks(self) -> list[tuple[int, str, Task]]:
    """(stage, kind, task) of every program (the whole-mesh update on stage
    -1, the combine on ``combine_stage``)."""
    out = [(st.index, k, t) for st in self.stages
           for k, t in st.tasks().items()]
    if self.combine is not None:
      out.append((self.combine_stage, COMBINE, self.combine))
    if self.update is not None:
      out.append((-1, GLOBAL, self.update))
    return out

  @functools.cached_property
  def _made_by(self) -> dict[int, tuple[int, str]]:
    """Tensor id -> (stage, kind) of the first program that outputs it."""
    out = {}
    for s, kind, task in self.all_tasks():
      if kind != "R":
        for t in task.out_ids:
          out.setdefault(t, (s, kind))
    return out

  @functools.cached_property
  def producer(self) -> dict[int, int]:
    """Tensor id -> the stage whose program outputs it (per micro-batch
    tensors: the forward or backward; per-step ones: the stage-local update
    programs and the combine; the whole-mesh update: -1)."""
    return {t: s for t, (s, _) in self._made_by.items()}

  def tensor_kind(self, t: int, micro_batch: int | None,
                  nbytes: int) -> TensorKind:
    """What ``t`` is, where it crosses a stage boundary."""
    if micro_batch is not None:
      if self._made_by.get(t, (None, None))[1] == TaskKind.BACKWARD.value:
        return TensorKind.ACTIVATION_GRADIENT
      return TensorKind.ACTIVATION
    if nbytes <= SMALL_BYTES:
      return TensorKind.SCALAR
    if t in self.accumulated:
      return TensorKind.GRADIENT
    return TensorKind.PARAMETER

  @functools.cached_property
  def per_step_ids(self) -> frozenset[int]:
    """Step inputs that are the same for every micro-batch (parameters)."""
    return frozenset(self.invar_ids) - frozenset(self.batch_ids)

  def portable(self) -> "PipelineProgram":
    """The program with every task in its exported, portable form."""
    stages = tuple(dataclasses.replace(
        s, forward=s.forward.portable(), backward=s.backward.portable(),
        reduce=s.reduce and s.reduce.portable(),
        update=s.update and s.update.portable(),
        partial=s.partial and s.partial.portable()) for s in self.stages)
    return dataclasses.replace(self, stages=stages,
                               update=self.update and self.update.portable(),
                               combine=self.combine and self.combine.portable())


def _last_uses(tasks, stages: Sequence[StageProgram], per_step, n):
  """Task position -> tensors whose last reader (or, for outputs nobody in
  the pipeline reads, whose producer) is that task."""
  index_of = {task: i for i, task in enumerate(tasks)}
  readers: dict = {}
  for st in stages:
    for kind in TaskKind:
      for t in st.task(kind).in_ids:
        readers.setdefault(t, set()).add((kind.value, st.index))
  frees: dict = {}
  for t, rs in readers.items():
    if t in per_step:
      continue  # parameters stay for the whole step
    for m in range(n):
      last = max(index_of[(kind, k, m)] for kind, k in rs)
      frees.setdefault(last, []).append(t)
  for st in stages:
    for kind in TaskKind:
      for t in st.task(kind).out_ids:
        if t not in readers:
          for m in range(n):
            frees.setdefault(index_of[(kind.value, st.index, m)], []).append(t)
  return frees


def build_instructions(tasks, stages: Sequence[StageProgram], per_step,
                       marked, num_micro_batches: int):
  """The instruction list for tasks in clock order.

  Args:
    tasks: (kind, stage, micro-batch) in execution order.
    stages: the stage programs.
    per_step: tensor ids that are the same for every micro-batch.
    marked: tensor ids to accumulate.
    num_micro_batches: micro-batches per step.
  """
  frees = _last_uses(tasks, stages, per_step, num_micro_batches)
  last_backward = {s: pos for pos, (kind, s, _) in enumerate(tasks)
                   if kind == TaskKind.BACKWARD}
  out = []
  seen = set()
  for pos, (kind, s, m) in enumerate(tasks):
    task = stages[s].task(kind)
    for t in task.in_ids:
      mb = None if t in per_step else m
      key = (t, mb, s, kind)
      if mb is None and key in seen:
        continue
      seen.add(key)
      out.append(Instruction(Instr.RECV, s, kind, mb, t))
    out.append(Instruction(Instr.RUN, s, kind, m))
    for t in task.out_ids:
      if t in marked:
        out.append(Instruction(Instr.ACC, s, kind, m, t))
    for t in frees.get(pos, ()):
      out.append(Instruction(Instr.FREE, s, kind, m, t))
    if stages[s].reduce is not None and last_backward.get(s) == pos:
      out.append(Instruction(Instr.REDUCE, s, "R", None))
  return tuple(out)


def _averages(instructions, stages: Sequence[StageProgram], accumulated):
  """``instructions`` with an AVG of each accumulated tensor right after the
  last instruction that writes it (its last ACC, or its stage's REDUCE)."""
  last: dict = {}
  for pos, ins in enumerate(instructions):
    if ins.kind is Instr.ACC:
      last[ins.tensor] = (pos, ins.stage)
    elif ins.kind is Instr.REDUCE:
      for t in stages[ins.stage].reduce.out_ids:
        last[t] = (pos, ins.stage)
  after: dict = {}
  for t in accumulated:
    if t in last:
      pos, s = last[t]
      after.setdefault(pos, []).append(Instruction(Instr.AVG, s, "A", None, t))
  out = []
  for pos, ins in enumerate(instructions):
    out.append(ins)
    out.extend(after.get(pos, ()))
  return out


def _update_instructions(stages: Sequence[StageProgram], update: Task | None,
                         combine: Task | None, combine_stage: int):
  """RECV / RUN of the per-step update programs: partials, combine, each
  stage's update, the whole-mesh update."""
  order = [(st.index, PARTIAL, st.partial) for st in stages if st.partial]
  if combine is not None:
    order.append((combine_stage, COMBINE, combine))
  order += [(st.index, UPDATE, st.update) for st in stages if st.update]
  if update is not None:
    order.append((-1, GLOBAL, update))
  out = []
  for s, kind, task in order:
    out.extend(Instruction(Instr.RECV, s, kind, None, t)
               for t in dict.fromkeys(task.in_ids))
    out.append(Instruction(Instr.UPDATE, s, kind, None))
  return out


def emit_program(stages: Sequence[StageProgram], update: Task | None, clocks,
                 invar_ids, batch_ids, accumulated, num_micro_batches: int,
                 *, out_ids=(), combine: Task | None = None,
                 combine_stage: int = -1) -> PipelineProgram:
  """The ``PipelineProgram`` of compiled stages run in ``clocks`` order,
  then the update: ``update`` on the whole mesh, or each stage's own
  (``StageProgram.update``, with ``combine`` for cross-stage reductions)."""
  tasks = [task for clock in clocks for task in clock]
  per_step = frozenset(invar_ids) - frozenset(batch_ids)
  instructions = build_instructions(tasks, stages, per_step, set(accumulated),
                                    num_micro_batches)
  instructions = _averages(instructions, stages, sorted(accumulated))
  instructions += _update_instructions(stages, update, combine, combine_stage)
  return PipelineProgram(tuple(stages), update, tuple(instructions),
                         tuple(invar_ids), tuple(batch_ids),
                         tuple(sorted(accumulated)), num_micro_batches,
                         out_ids=tuple(out_ids), combine=combine,
                         combine_stage=combine_stage)
