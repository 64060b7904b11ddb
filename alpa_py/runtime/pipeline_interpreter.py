"""The one interpreter of a ``PipelineProgram``.

Both runtimes call ``interpret``; they differ only in their ``Transport``:
where a step input comes from, how a tensor is placed into a task's layout,
how a tensor produced on another host arrives, and which stages this process
runs. The interpreter counts the bytes that cross stage boundaries, by what
they are (``TensorKind``), on the receiving side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.compiler.pipeline_program import (GLOBAL, Instr,
                                               PipelineProgram, TensorKind)


@dataclasses.dataclass
class RunStats:
  """Measured on one call.

  ``crossing_bytes``: per ``TensorKind`` value, the bytes (of the whole
  tensor) that a task received from another stage's devices, from the host
  or from another process; a stage's second program reading a tensor its
  first already received takes that copy. Batch inputs are not counted.
  """

  peak_activation_bytes: int = 0  # live per-micro-batch tensors, at peak
  transfers: int = 0  # reshards into a task's layout that moved data
  tasks: int = 0  # stage programs run (forward, backward, reduce)
  update_programs: int = 0  # update programs run (P, C, U, G)
  crossing_bytes: dict = dataclasses.field(
      default_factory=lambda: {k.value: 0 for k in TensorKind})

  @property
  def crossing_total(self) -> int:
    return sum(self.crossing_bytes.values())

  def merged(self, other: "RunStats") -> "RunStats":
    """This process's stats and another's (Ray: one per worker)."""
    return RunStats(
        max(self.peak_activation_bytes, other.peak_activation_bytes),
        self.transfers + other.transfers, self.tasks + other.tasks,
        self.update_programs + other.update_programs,
        {k: self.crossing_bytes.get(k, 0) + other.crossing_bytes.get(k, 0)
         for k in set(self.crossing_bytes) | set(other.crossing_bytes)})


class Transport(Protocol):
  """How one runtime moves data for the interpreter."""

  block: bool  # wait for each task (XLA's CPU collectives stall otherwise)

  def owns(self, stage: int) -> bool:
    """Whether this process runs ``stage``'s instructions (stage -1, the
    whole-mesh update, runs everywhere)."""

  def program(self, key) -> tuple[Callable, tuple]:
    """(callable, argument shardings) of ``(kind, stage)``."""

  def step_value(self, t: int) -> Any:
    """A per-step input (a parameter), in any layout."""

  def batch_value(self, t: int) -> Any:
    """A whole batch input; the interpreter slices the micro-batches."""

  def place(self, value, sharding) -> Any:
    """``value`` laid out as a task's argument."""

  def receive(self, t: int, m: int | None) -> Any:
    """Micro-batch ``m``'s value of ``t`` (None: its per-step value),
    produced by another process."""

  def send(self, t: int, m: int | None, value) -> None:
    """Offers a produced value to other processes (a no-op locally)."""


def micro_batch(x, m: int, n: int):
  """Micro-batch ``m`` of ``n`` of a batch: rows m, m + n, m + 2n, ..."""
  if n == 1:
    return x
  return x.reshape((x.shape[0] // n, n) + x.shape[1:])[:, m]


def _devices(x):
  return x.sharding.device_set if isinstance(x, jax.Array) else None


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def interpret(program: PipelineProgram,
              transport: Transport) -> tuple[list, RunStats]:
  """Runs one step: the pipeline, then the update.

  Returns:
    (the step's flat outputs, None for those another process holds; the
    ``RunStats`` of this call).
  """
  n = program.num_micro_batches
  batch_ids = set(program.batch_ids)
  invars = set(program.invar_ids)
  store: dict = {}  # (t, m) -> a produced value or a batch slice
  moved: dict = {}  # (t, m or None, stage, task) -> value in a task's layout
  acc: dict = {}
  last: dict = {}
  stats = RunStats()

  def source(t, m):
    """(value, whether it is already where its readers on this process
    are)."""
    if (t, m) in store:
      return store[(t, m)], True
    if m is None:
      if t in invars:
        return transport.step_value(t), True
      if t in acc:
        return acc[t], True
      # an accumulator or an update program's result, made elsewhere
      return transport.receive(t, None), False
    if t in batch_ids:
      store[(t, m)] = micro_batch(transport.batch_value(t), m, n)
      return store[(t, m)], True
    return transport.receive(t, m), False

  def recv(s, kind, m, t):
    task = program.task(s, kind)
    _, shardings = transport.program((kind, s))
    sharding = shardings[task.in_ids.index(t)]
    # a copy this stage already received (its other program read it)
    src = next((v for (x, mb, st, _), v in moved.items()
                if x == t and mb == m and st == s and s >= 0), None)
    if src is None:
      src, local = source(t, m)
      target = sharding.device_set
      if t not in batch_ids and (not local or _devices(src) != target):
        kind_ = program.tensor_kind(t, m, _nbytes(src)).value
        stats.crossing_bytes[kind_] += _nbytes(src)
    val = transport.place(src, sharding)
    stats.transfers += val is not src
    return val

  def run(s, kind, m, args):
    fn, _ = transport.program((kind, s))
    outs = fn(*args)
    if transport.block:
      jax.block_until_ready(outs)
    stats.tasks += 1
    return outs

  for ins in program.instructions:
    s, kind, m, t = ins.stage, ins.task, ins.micro_batch, ins.tensor
    if kind != GLOBAL and not transport.owns(s):
      continue
    if ins.kind is Instr.RECV:
      moved[(t, m, s, kind)] = recv(s, kind, m, t)
    elif ins.kind is Instr.RUN or ins.kind is Instr.UPDATE:
      task = program.task(s, kind)
      args = [moved[(x, m, s, kind)] if (x, m, s, kind) in moved
              else moved[(x, None, s, kind)] for x in task.in_ids]
      outs = run(s, kind, m, args)
      if ins.kind is Instr.UPDATE:
        stats.tasks -= 1
        stats.update_programs += 1
      last = dict(zip(task.out_ids, outs))
      for x, v in last.items():
        store[(x, m)] = v
        transport.send(x, m, v)
      if m is not None:
        live = sum(v.nbytes for (_, mb), v in store.items()
                   if mb is not None) + sum(
                       v.nbytes for key, v in moved.items()
                       if key[1] is not None)
        stats.peak_activation_bytes = max(stats.peak_activation_bytes, live)
    elif ins.kind is Instr.ACC:
      acc[t] = last[t] if t not in acc else acc[t] + last[t]
    elif ins.kind is Instr.REDUCE:
      task = program.task(s, "R")
      _, shardings = transport.program(("R", s))
      outs = run(s, "R", None, [transport.place(acc[x], shd)
                                for x, shd in zip(task.in_ids, shardings)])
      acc.update(zip(task.out_ids, outs))
    elif ins.kind is Instr.AVG:
      if n > 1 and jnp.issubdtype(acc[t].dtype, jnp.inexact):
        acc[t] = acc[t] / n
      transport.send(t, None, acc[t])
    else:  # FREE
      store.pop((t, m), None)
      for key in [key for key in moved if key[0] == t and key[1] == m]:
        del moved[key]
  outs = []
  for t in program.outputs:
    if (t, None) in store:
      outs.append(store[(t, None)])
    elif t in acc:
      outs.append(acc[t])
    else:
      outs.append(None)
  return outs, stats
