"""The one interpreter of a ``PipelineProgram``.

Both runtimes call ``interpret``; they differ only in their ``Transport``:
where a step input comes from, how a tensor is placed into a task's layout,
how a tensor produced on another host arrives, which stages this process
runs, and how the accumulated values meet for the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax

from alpa_py.compiler.pipeline_program import Instr, PipelineProgram


@dataclasses.dataclass
class RunStats:
  """Measured on one call."""

  peak_activation_bytes: int = 0  # live per-micro-batch tensors, at peak
  transfers: int = 0  # reshards into a task's layout that moved data
  tasks: int = 0


class Transport(Protocol):
  """How one runtime moves data for the interpreter."""

  block: bool  # wait for each task (XLA's CPU collectives stall otherwise)

  def owns(self, stage: int) -> bool:
    """Whether this process runs ``stage``'s instructions."""

  def program(self, key) -> tuple[Callable, tuple]:
    """(callable, argument shardings) of ``("F"|"B"|"R", stage)`` or
    "update"."""

  def step_value(self, t: int) -> Any:
    """A per-step input (a parameter), in any layout."""

  def batch_value(self, t: int) -> Any:
    """A whole batch input; the interpreter slices the micro-batches."""

  def place(self, value, sharding) -> Any:
    """``value`` laid out as a stage task's argument."""

  def receive(self, t: int, m: int) -> Any:
    """Micro-batch ``m``'s value of ``t``, produced by another process."""

  def send(self, t: int, m: int, value) -> None:
    """Offers a produced value to other processes (a no-op locally)."""

  def accumulated(self, acc: dict) -> dict:
    """Every accumulated value the update reads, from this process's ``acc``
    and the other processes'."""

  def update_value(self, t: int) -> Any:
    """A step input the update reads."""

  def place_update(self, value, sharding) -> Any:
    """``value`` laid out as an update argument."""


def micro_batch(x, m: int, n: int):
  """Micro-batch ``m`` of ``n`` of a batch: rows m, m + n, m + 2n, ..."""
  if n == 1:
    return x
  return x.reshape((x.shape[0] // n, n) + x.shape[1:])[:, m]


def interpret(program: PipelineProgram,
              transport: Transport) -> tuple[list, RunStats]:
  """Runs one step: the instruction list, then the update once.

  Returns:
    (the update's flat outputs, the ``RunStats`` of this call).
  """
  n = program.num_micro_batches
  batch_ids = set(program.batch_ids)
  store: dict = {}  # (t, m) -> a produced value or a batch slice
  moved: dict = {}  # (t, m or None, stage, task) -> value in a task's layout
  acc: dict = {}
  last: dict = {}
  stats = RunStats()

  def source(t, m):
    if m is None:
      return transport.step_value(t)
    if (t, m) not in store:
      if t in batch_ids:
        store[(t, m)] = micro_batch(transport.batch_value(t), m, n)
      else:
        return transport.receive(t, m)
    return store[(t, m)]

  for ins in program.instructions:
    s, kind, m, t = ins.stage, ins.task, ins.micro_batch, ins.tensor
    if not transport.owns(s):
      continue
    if ins.kind is Instr.RECV:
      task = program.task(s, kind)
      _, shardings = transport.program((kind, s))
      src = source(t, m)
      val = transport.place(src, shardings[task.in_ids.index(t)])
      stats.transfers += val is not src
      moved[(t, m, s, kind)] = val
    elif ins.kind is Instr.RUN:
      task = program.task(s, kind)
      fn, _ = transport.program((kind, s))
      args = [moved[(x, m, s, kind)] if (x, m, s, kind) in moved
              else moved[(x, None, s, kind)] for x in task.in_ids]
      outs = fn(*args)
      if transport.block:
        jax.block_until_ready(outs)
      last = dict(zip(task.out_ids, outs))
      for x, v in last.items():
        store[(x, m)] = v
        transport.send(x, m, v)
      stats.tasks += 1
      live = sum(v.nbytes for v in store.values()) + sum(
          v.nbytes for key, v in moved.items() if key[1] is not None)
      stats.peak_activation_bytes = max(stats.peak_activation_bytes, live)
    elif ins.kind is Instr.ACC:
      acc[t] = last[t] if t not in acc else acc[t] + last[t]
    elif ins.kind is Instr.REDUCE:
      task = program.task(s, "R")
      fn, shardings = transport.program(("R", s))
      outs = fn(*[transport.place(acc[x], shd)
                  for x, shd in zip(task.in_ids, shardings)])
      if transport.block:
        jax.block_until_ready(outs)
      acc.update(zip(task.out_ids, outs))
      stats.tasks += 1
    else:  # FREE
      store.pop((t, m), None)
      for key in [key for key in moved if key[0] == t and key[1] == m]:
        del moved[key]
  totals = transport.accumulated(acc)
  fn, shardings = transport.program("update")
  args = [transport.place_update(
              totals[t] if t in totals else transport.update_value(t), shd)
          for t, shd in zip(program.update.in_ids, shardings)]
  outs = fn(*args)
  if transport.block:
    jax.block_until_ready(outs)
  return list(outs), stats
