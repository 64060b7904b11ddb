"""Checking a ``PipelineProgram`` before it runs: every read has a value.

The interpreter (``runtime/pipeline_interpreter.py``) runs the instruction
list in order and trusts it. A task that reads a tensor no earlier
instruction produced fails only at run time, on the first call, with a
lookup error far from the layer and stage assignment that caused it.
``check_program`` walks the list as the interpreter does, keeping track of
what exists, and raises ``ScheduleError`` naming the tensor, the op and task
that produce it and the ops and task that read it.

What each read needs:

* RECV of a per-step tensor (``micro_batch`` None): a step input that is
  not a batch input (a parameter).
* RECV of a micro-batch tensor: a batch input, or a tensor an earlier RUN
  produced for that micro-batch, not freed since.
* RUN (UPDATE for an update program): every tensor its task reads
  received for that task (the micro-batch's value or the per-step one), not
  freed since.
* ACC: an output of the RUN just before it, not yet complete (AVG).
* a per-step program over the accumulators (REDUCE): its inputs
  accumulated.
* AVG: a tensor accumulated, once.
* RECV of a per-step tensor by an update program (P, C, U, G): a step
  input, an accumulated tensor after its AVG, or the result of an update
  program run earlier.
* the step's outputs: each made by an update program, accumulated, or a
  step input.
"""

from __future__ import annotations

import functools

from alpa_py.compiler.errors import ScheduleError
from alpa_py.compiler.graph import OpGraph
from alpa_py.compiler.pipeline_program import (GLOBAL, UPDATE_KINDS, Instr,
                                               Instruction, PipelineProgram)
from alpa_py.compiler.program import Task

_TASK_NAMES = {"F": "forward", "B": "backward", "R": "reduce",
               "P": "update partials", "C": "cross-stage combine",
               "U": "update"}


def _task_name(stage: int, kind: str) -> str:
  if kind == GLOBAL:
    return "the whole-mesh update (G)"
  return f"the {_TASK_NAMES.get(kind, kind)} of stage {stage} ({kind}{stage})"


def _mb(m: int | None) -> str:
  return "the per-step value" if m is None else f"micro-batch {m}"


class _Describe:
  """Names of tensors, ops and tasks, for error messages (built on the
  error path only)."""

  def __init__(self, program: PipelineProgram, graph: OpGraph):
    self.program = program
    self.graph = graph

  @functools.cached_property
  def ops(self) -> dict:
    return {op.index: op for op in self.graph.ops}

  @functools.cached_property
  def producers(self) -> dict[int, list[tuple[int, str]]]:
    """Tensor id -> the (stage, kind) tasks that output it."""
    out: dict = {}
    for s, kind, task in self.program.all_tasks():
      for t in task.out_ids:
        out.setdefault(t, []).append((s, kind))
    return out

  def op(self, index: int) -> str:
    return f"`{self.ops[index].name}` #{index}"

  def tensor(self, t: int) -> str:
    if 0 <= t < len(self.graph.tensors):
      info = self.graph.tensor(t)
      return f"%{t} ({info.dtype}{list(info.shape)})"
    return f"%{t}"

  def task_ops(self, task: Task) -> set[int]:
    """The ops a task runs: those its outputs depend on, back to its
    inputs."""
    stop, seen, ops = set(task.in_ids), set(), set()
    stack = list(task.out_ids)
    while stack:
      t = stack.pop()
      if t in seen or t in stop:
        continue
      seen.add(t)
      p = self.graph.producer.get(t)
      if p is None or p in ops:
        continue
      ops.add(p)
      stack.extend(x for x in self.ops[p].inputs if isinstance(x, int))
    return ops

  def readers(self, t: int, stage: int, kind: str) -> str:
    """The ops of task (stage, kind) that read ``t``."""
    task = self.program.task(stage, kind)
    consumers = self.graph.consumers.get(t, ())
    mine = sorted(c for c in consumers if c in self.task_ops(task))
    if mine:
      return "reader op(s) " + ", ".join(self.op(c) for c in mine)
    if consumers:
      return ("no op of the task reads it (it passes it on); readers in the "
              "step: " + ", ".join(self.op(c) for c in sorted(consumers)))
    return "no op reads it (it passes it on)"

  def producer(self, t: int, m: int | None) -> str:
    """Who produces ``t`` and when it runs for micro-batch ``m``."""
    p = self.graph.producer.get(t)
    op = f"op {self.op(p)}" if p is not None else "no op (a step input)"
    tasks = self.producers.get(t, [])
    if not tasks:
      return f"produced by {op}, which runs in no stage's program"
    parts = []
    for s, kind in tasks:
      runs = [k for k, ins in enumerate(self.program.instructions)
              if ins.kind in (Instr.RUN, Instr.UPDATE) and ins.stage == s
              and ins.task == kind and ins.micro_batch == m]
      when = (f"runs for {_mb(m)} at instruction {runs[0]}" if runs
              else f"never runs for {_mb(m)}")
      parts.append(f"{_task_name(s, kind)}, which {when}")
    return f"produced by {op} in " + "; and in ".join(parts)


def _fail(pos: int, ins: Instruction, what: str, hint: str = "") -> None:
  raise ScheduleError(f"pipeline program, instruction {pos} (`{ins}`): "
                      f"{what}" + (f". {hint}" if hint else ""))


_ORDER_HINT = ("A task may read only what a task run earlier for the same "
               "micro-batch produced: the stage assignment must put a "
               "backward value's producer in the same or a later stage than "
               "each of its readers (compiler/layers.py)")


def check_program(program: PipelineProgram, graph: OpGraph) -> None:
  """Checks that every read of ``program`` finds its value (module doc).

  Args:
    program: the pipelined step.
    graph: the step's graph (one micro-batch), for op names and shapes.

  Raises:
    ScheduleError: the first read without a value, naming the tensor, its
      producer op and task, the reading task and its ops that read it.
  """
  say = _Describe(program, graph)
  batch = frozenset(program.batch_ids)
  per_step = program.per_step_ids
  live: dict = {}  # (t, m) -> position of the RUN that produced it
  freed: dict = {}  # (t, m) -> position of the FREE that dropped it
  moved: dict = {}  # (t, m) -> {(stage, kind): position of the RECV}
  last_run = None  # (stage, kind, m) of the latest RUN
  acc: set = set()
  done: set = set()  # accumulators complete (AVG)
  accumulated = frozenset(program.accumulated)
  for pos, ins in enumerate(program.instructions):
    s, kind, m, t = ins.stage, ins.task, ins.micro_batch, ins.tensor
    if ins.kind is Instr.RECV:
      task = program.task(s, kind)
      if t not in task.in_ids:
        _fail(pos, ins, f"{_task_name(s, kind)} does not read tensor "
              f"{say.tensor(t)}")
      if m is None:
        if kind in UPDATE_KINDS and t in accumulated:
          if t not in done:
            _fail(pos, ins, f"{_task_name(s, kind)} reads accumulator "
                  f"{say.tensor(t)} before it is complete (its AVG)")
        elif kind in UPDATE_KINDS and t not in per_step:
          if (t, None) not in live:
            _fail(pos, ins, f"{_task_name(s, kind)} reads tensor "
                  f"{say.tensor(t)} before an update program made it; "
                  + say.producer(t, None))
        elif t not in per_step:
          _fail(pos, ins, f"tensor {say.tensor(t)} is received once per step "
                "but is not a per-step input (a parameter); "
                + say.producer(t, 0))
      elif t in per_step:
        _fail(pos, ins, f"per-step input {say.tensor(t)} is received for "
              f"{_mb(m)}; per-step inputs are received with no micro-batch")
      elif t not in batch and (t, m) not in live:
        if (t, m) in freed:
          why = (f"it was freed at instruction {freed[(t, m)]} "
                 f"(`{program.instructions[freed[(t, m)]]}`) before this read")
        else:
          why = "it is not produced before this read"
        _fail(pos, ins, f"{_task_name(s, kind)} reads tensor {say.tensor(t)} "
              f"of {_mb(m)}, but {why}; {say.readers(t, s, kind)}; "
              f"{say.producer(t, m)}", _ORDER_HINT)
      moved.setdefault((t, m), {})[(s, kind)] = pos
    elif ins.kind is Instr.RUN or ins.kind is Instr.UPDATE:
      task = program.task(s, kind)
      for x in task.in_ids:
        if (s, kind) not in moved.get((x, m), {}) and \
            (s, kind) not in moved.get((x, None), {}):
          gone = ("" if (x, m) not in freed else
                  f" (freed at instruction {freed[(x, m)]})")
          _fail(pos, ins, f"{_task_name(s, kind)} runs for {_mb(m)} without "
                f"tensor {say.tensor(x)} received{gone}; "
                f"{say.readers(x, s, kind)}; {say.producer(x, m)}")
      for x in task.out_ids:
        live[(x, m)] = pos
        freed.pop((x, m), None)
      last_run = (s, kind, m)
    elif ins.kind is Instr.ACC:
      if last_run != (s, kind, m) or t not in program.task(s, kind).out_ids:
        _fail(pos, ins, f"tensor {say.tensor(t)} is accumulated, but the RUN "
              "just before is not the task that outputs it")
      if t in done:
        _fail(pos, ins, f"tensor {say.tensor(t)} is accumulated after its "
              "AVG made it complete")
      acc.add(t)
    elif ins.kind is Instr.FREE:
      if live.pop((t, m), None) is not None:
        freed[(t, m)] = pos
      moved.pop((t, m), None)
    elif ins.kind is Instr.AVG:
      if t not in acc or t in done:
        _fail(pos, ins, f"AVG of tensor {say.tensor(t)}, which is "
              + ("already complete" if t in done else "not accumulated"))
      done.add(t)
    else:  # a per-step program over the accumulators (REDUCE)
      task = program.task(s, kind)
      for x in task.in_ids:
        if x not in acc:
          _fail(pos, ins, f"{_task_name(s, kind)} reads accumulator "
                f"{say.tensor(x)} before any ACC of it")
      acc.update(task.out_ids)
  if program.update is not None:
    for t in program.update.in_ids:
      if t not in acc and t not in program.invar_ids:
        raise ScheduleError(
            f"pipeline program: the update reads tensor {say.tensor(t)}, "
            "which is neither accumulated nor a step input; "
            f"{say.producer(t, 0)}")
  for t in program.outputs:
    if (t, None) not in live and t not in acc and t not in program.invar_ids:
      raise ScheduleError(
          f"pipeline program: step output {say.tensor(t)} is made by no "
          f"update program, accumulator or step input; {say.producer(t, None)}")
