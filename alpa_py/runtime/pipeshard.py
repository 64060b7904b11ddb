"""Running a pipelined step on the local backend.

The driver walks the schedule's instruction list: for each task it gathers
the inputs (step inputs, this micro-batch's slice of the batch, or tensors
other tasks produced), moves them to the task's submesh and layout
(``transfer.reshard``), runs the stage's compiled executable, adds marked
values (gradients, loss) into per-stage accumulators, and frees every
micro-batch tensor right after its last use. Then the update runs once.
"""

from __future__ import annotations

import dataclasses
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

  def memory(self) -> int:
    m = self.compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)


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

  def __init__(self, *, plan, stages, apply, instructions, frees, consumed,
               invar_ids, batch_ids, marked, num_micro_batches, out_tree,
               compile_seconds, devices):
    self.plan = plan
    self._stages = stages  # list of {"F": TaskExec, "B": TaskExec}
    self._apply = apply
    self._instructions = instructions
    self._frees = frees
    self._consumed = consumed  # tensor -> whether a later task reads it
    self._invar_ids = invar_ids
    self._batch_ids = set(batch_ids)
    self._marked = set(marked)
    self._n = num_micro_batches
    self._out_tree = out_tree
    self.compile_seconds = compile_seconds
    self.last_run_stats = RunStats()
    self._block = all(d.platform == "cpu" for d in devices)
    self.in_shardings = None

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
    micro: dict = {}

    def batch_slice(t, m):
      key = (t, m)
      if key not in micro:
        x = step_vals[t]
        if n == 1:
          micro[key] = x
        else:
          mb = x.shape[0] // n
          micro[key] = x.reshape((mb, n) + x.shape[1:])[:, m]
      return micro[key]

    store: dict = {}  # (t, m) -> array
    moved: dict = {}  # (t, m or None, stage, kind) -> resharded array
    acc: dict = {}
    stats = RunStats()
    peak = 0
    for k, (kind, s, m) in enumerate(self._instructions):
      ex = self._stages[s][kind]
      args = []
      for t, shd in zip(ex.in_ids, ex.in_shardings):
        per_step = t in step_vals and t not in self._batch_ids
        key = (t, None if per_step else m, s, kind)
        val = moved.get(key)
        if val is None:
          if per_step:
            src = step_vals[t]
          elif t in self._batch_ids:
            src = batch_slice(t, m)
          else:
            src = store[(t, m)]
          val = reshard(src, shd)
          if val is not src:
            stats.transfers += 1
          moved[key] = val
        args.append(val)
      outs = ex.compiled(*args)
      for t, v in zip(ex.out_ids, outs):
        if t in self._marked:
          acc[t] = v if t not in acc else acc[t] + v
        if self._consumed.get(t):
          store[(t, m)] = v
      if self._block:
        jax.block_until_ready(outs)
      stats.tasks += 1
      live = sum(v.nbytes for v in store.values()) + sum(
          v.nbytes for key, v in moved.items() if key[1] is not None)
      peak = max(peak, live)
      for t in self._frees.get(k, ()):
        store.pop((t, m), None)
        micro.pop((t, m), None)
        for k2 in ("F", "B"):
          for s2 in range(len(self._stages)):
            moved.pop((t, m, s2, k2), None)
    stats.peak_activation_bytes = peak
    # the update, once
    args = []
    for t, shd in zip(self._apply.in_ids, self._apply.in_shardings):
      src = acc[t] if t in acc else step_vals[t]
      args.append(reshard(src, shd))
    outs = self._apply.compiled(*args)
    if self._block:
      jax.block_until_ready(outs)
    self.last_run_stats = stats
    return jax.tree_util.tree_unflatten(self._out_tree, list(outs))
