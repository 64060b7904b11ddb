"""The program of a pipelined step: what the compiler emits, what every
runtime interprets.

The schedule's clock table becomes an instruction list: RECV moves a tensor
(a step input, this micro-batch's slice of the batch, or another task's
output) into a task's submesh and layout; RUN runs a stage's compiled forward
or backward program; ACC adds a marked value (gradient, loss) into its
accumulator; FREE drops a micro-batch tensor after its last reader; REDUCE
runs a stage's reduce program on its accumulators once its last backward has
run (data-parallel stages that keep per-device partial gradients, see
``compiler/deferred_reduction.py``). After the list, the update runs once on
the accumulated values.

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
    return f"{self.kind.value:<4} {self.task}{self.stage}.{mb}{t}"


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """One stage: its two programs, its devices and, where its backward keeps
  per-device partial gradients, the program that reduces them once per step
  (``reduce``, task kind "R")."""

  index: int
  forward: Task
  backward: Task
  device_ids: tuple[int, ...]
  logical_shape: tuple[int, ...]
  reduce: Task | None = None

  def task(self, kind: str) -> Task:
    if kind == "R":
      return self.reduce
    return self.forward if kind == TaskKind.FORWARD else self.backward


@dataclasses.dataclass(frozen=True)
class PipelineProgram:
  """A pipelined step, ready to run.

  Attributes:
    stages: the stages, in pipeline order.
    update: the optimizer update, run once per step on the whole mesh.
    instructions: the micro-batch program (RECV / RUN / ACC / FREE).
    invar_ids: tensor id of each flat step input.
    batch_ids: the step inputs split into micro-batches.
    accumulated: marked tensors accumulated over micro-batches (the update
      reads their mean where they are inexact).
    num_micro_batches: micro-batches per step.
  """

  stages: tuple[StageProgram, ...]
  update: Task
  instructions: tuple[Instruction, ...]
  invar_ids: tuple[int, ...]
  batch_ids: tuple[int, ...]
  accumulated: tuple[int, ...]
  num_micro_batches: int

  def task(self, stage: int, kind: str) -> Task:
    return self.stages[stage].task(kind)

  @functools.cached_property
  def producer(self) -> dict[int, int]:
    """Tensor id -> the stage whose program outputs it."""
    return {t: st.index for st in self.stages
            for task in (st.forward, st.backward) for t in task.out_ids}

  @functools.cached_property
  def per_step_ids(self) -> frozenset[int]:
    """Step inputs that are the same for every micro-batch (parameters)."""
    return frozenset(self.invar_ids) - frozenset(self.batch_ids)

  def portable(self) -> "PipelineProgram":
    """The program with every task in its exported, portable form."""
    stages = tuple(dataclasses.replace(
        s, forward=s.forward.portable(), backward=s.backward.portable(),
        reduce=s.reduce and s.reduce.portable()) for s in self.stages)
    return dataclasses.replace(self, stages=stages,
                               update=self.update.portable())


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


def emit_program(stages: Sequence[StageProgram], update: Task, clocks,
                 invar_ids, batch_ids, accumulated,
                 num_micro_batches: int) -> PipelineProgram:
  """The ``PipelineProgram`` of compiled stages run in ``clocks`` order."""
  tasks = [task for clock in clocks for task in clock]
  per_step = frozenset(invar_ids) - frozenset(batch_ids)
  instructions = build_instructions(tasks, stages, per_step, set(accumulated),
                                    num_micro_batches)
  return PipelineProgram(tuple(stages), update, instructions, tuple(invar_ids),
                         tuple(batch_ids), tuple(sorted(accumulated)),
                         num_micro_batches)
