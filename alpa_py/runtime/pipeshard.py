"""Running a pipelined step on the local backend.

The schedule's clock table becomes an instruction list: RECV moves a tensor
(a step input, this micro-batch's slice of the batch, or another task's
output) into a task's submesh and layout (``transfer.reshard``); RUN runs a
stage's compiled forward or backward program; ACC adds a marked value
(gradient, loss) into its accumulator; FREE drops a micro-batch tensor after
its last reader. The driver walks the list, then runs the update once.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax

from alpa_py.runtime.transfer import reshard


@dataclasses.dataclass
class TaskExec:
  """One compiled piece: a stage's forward or backward, or the update."""

  compiled: Any
  in_ids: tuple[int, ...]
  out_ids: tuple[int, ...]
  in_shardings: tuple
  jitted: Any = None  # for export to remote workers
  sds: Any = None
  out_shardings: Any = None

  def memory(self) -> int:
    m = self.compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)


class Instr(enum.Enum):
  """Instruction kinds of a pipelined step."""

  RECV = "recv"  # bring a tensor into a task's submesh and layout
  RUN = "run"  # run a stage's forward or backward program
  ACC = "acc"  # add a marked output into its accumulator
  FREE = "free"  # drop a micro-batch tensor after its last use


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One step of the driver's program.

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


def build_instructions(tasks, stages, per_step, marked, frees):
  """The instruction list for tasks in clock order.

  Args:
    tasks: (kind, stage, micro-batch) in execution order.
    stages: per stage {"F": TaskExec, "B": TaskExec}.
    per_step: tensor ids that are the same for every micro-batch.
    marked: tensor ids to accumulate.
    frees: task position -> tensors whose last reader that task is.
  """
  out = []
  seen = set()
  for pos, (kind, s, m) in enumerate(tasks):
    ex = stages[s][kind]
    for t in ex.in_ids:
      mb = None if t in per_step else m
      key = (t, mb, s, kind)
      if mb is None and key in seen:
        continue
      seen.add(key)
      out.append(Instruction(Instr.RECV, s, kind, mb, t))
    out.append(Instruction(Instr.RUN, s, kind, m))
    for t in ex.out_ids:
      if t in marked:
        out.append(Instruction(Instr.ACC, s, kind, m, t))
    for t in frees.get(pos, ()):
      out.append(Instruction(Instr.FREE, s, kind, m, t))
  return tuple(out)


@dataclasses.dataclass
class RunStats:
  """Measured on the last call."""

  peak_activation_bytes: int = 0  # live per-micro-batch tensors, at peak
  transfers: int = 0  # cross-mesh reshards
  tasks: int = 0


class PipeshardExecutable:
  """A compiled pipelined step.

  Attributes:
    plan: the ``PipeshardPlan`` (stages, schedule, per-stage shardings).
    last_run_stats: ``RunStats`` of the last call (peak live activation bytes).
  """

  def __init__(self, *, plan, stages, apply, instructions, invar_ids,
               batch_ids, num_micro_batches, out_tree, compile_seconds,
               devices):
    self.plan = plan
    self._stages = stages  # list of {"F": TaskExec, "B": TaskExec}
    self._apply = apply
    self.instructions = instructions
    self._invar_ids = invar_ids
    self._batch_ids = set(batch_ids)
    self._n = num_micro_batches
    self._out_tree = out_tree
    self.compile_seconds = compile_seconds
    self.last_run_stats = RunStats()
    self._block = all(d.platform == "cpu" for d in devices)

  # -- public surface -------------------------------------------------------

  def memory_per_device(self) -> tuple[int, ...]:
    """Per stage, XLA's peak bytes per device (the larger of fwd / bwd)."""
    return tuple(max(st["F"].memory(), st["B"].memory()) for st in self._stages)

  def hlo_text(self) -> tuple[str, ...]:
    """Per stage, the optimized HLO of its forward and backward programs."""
    return tuple(st["F"].compiled.as_text() + "\n" + st["B"].compiled.as_text()
                 for st in self._stages)

  @property
  def schedule(self):
    return self.plan.schedule

  def __repr__(self):
    return (f"<alpa_py.PipeshardExecutable {len(self._stages)} stages, "
            f"{self._n} micro-batches, {self.plan.schedule_name}>")

  # -- running --------------------------------------------------------------

  def call_flat(self, leaves):
    n = self._n
    step_vals = dict(zip(self._invar_ids, leaves))
    store: dict = {}  # (t, m) -> array produced by a task, or a batch slice
    moved: dict = {}  # (t, m or None, stage, task) -> array in a task's layout
    acc: dict = {}
    stats = RunStats()
    peak = 0
    last_outs: dict = {}

    def source(t, m):
      if m is None:
        return step_vals[t]
      if (t, m) not in store and t in self._batch_ids:
        x = step_vals[t]
        if n > 1:  # micro-batch m: rows m, m + n, m + 2n, ...
          x = x.reshape((x.shape[0] // n, n) + x.shape[1:])[:, m]
        store[(t, m)] = x
      return store[(t, m)]

    for ins in self.instructions:
      s, task, m, t = ins.stage, ins.task, ins.micro_batch, ins.tensor
      if ins.kind is Instr.RECV:
        ex = self._stages[s][task]
        shd = ex.in_shardings[ex.in_ids.index(t)]
        src = source(t, m)
        val = reshard(src, shd)
        stats.transfers += val is not src
        moved[(t, m, s, task)] = val
      elif ins.kind is Instr.RUN:
        ex = self._stages[s][task]
        args = [moved[(x, m, s, task)] if (x, m, s, task) in moved
                else moved[(x, None, s, task)] for x in ex.in_ids]
        outs = ex.compiled(*args)
        if self._block:
          jax.block_until_ready(outs)
        last_outs = dict(zip(ex.out_ids, outs))
        for x, v in last_outs.items():
          store[(x, m)] = v
        stats.tasks += 1
        live = sum(v.nbytes for v in store.values()) + sum(
            v.nbytes for key, v in moved.items() if key[1] is not None)
        peak = max(peak, live)
      elif ins.kind is Instr.ACC:
        v = last_outs[t]
        acc[t] = v if t not in acc else acc[t] + v
      else:  # FREE
        store.pop((t, m), None)
        for key in [key for key in moved if key[0] == t and key[1] == m]:
          del moved[key]
    stats.peak_activation_bytes = peak
    # the update, once
    args = []
    for t, shd in zip(self._apply.in_ids, self._apply.in_shardings):
      args.append(reshard(acc[t] if t in acc else step_vals[t], shd))
    outs = self._apply.compiled(*args)
    if self._block:
      jax.block_until_ready(outs)
    self.last_run_stats = stats
    return jax.tree_util.tree_unflatten(self._out_tree, list(outs))
