"""Pipeline schedules as clock tables, and the instruction lists they imply.

A task is (kind, stage, micro-batch) with kind "F" (forward) or "B"
(backward). A schedule gives each stage its task order; ``clock_table``
places tasks on clocks so that a forward runs after the previous stage's
forward of the same micro-batch, and a backward after the next stage's
backward (the last stage's backward after its own forward).

* GPipe: all forwards, then all backwards.
* 1F1B: stage s runs ``K - s - 1`` warm-up forwards, then alternates one
  forward and one backward, so at most ``K - s`` micro-batches' activations
  are alive on it, against B for GPipe.
"""

from __future__ import annotations

import enum


class Schedule(enum.Enum):
  GPIPE = "gpipe"
  ONE_F_ONE_B = "1f1b"

  @classmethod
  def parse(cls, value) -> "Schedule":
    if isinstance(value, Schedule):
      return value
    for s in cls:
      if s.value == value:
        return s
    raise ValueError(f"pipeline_schedule (={value!r}) must be one of "
                     f"{[s.value for s in cls]}")


def stage_orders(schedule: Schedule, num_stages: int, num_micro_batches: int):
  """Per stage, its tasks in the order it runs them."""
  K, B = num_stages, num_micro_batches
  orders = []
  for s in range(K):
    if schedule is Schedule.GPIPE:
      order = [("F", s, m) for m in range(B)] + [("B", s, m) for m in range(B)]
    else:
      warm = min(K - s - 1, B)
      order = [("F", s, m) for m in range(warm)]
      f, b = warm, 0
      while f < B or b < B:
        if f < B:
          order.append(("F", s, f))
          f += 1
        if b < B:
          order.append(("B", s, b))
          b += 1
    orders.append(order)
  return orders


def clock_table(schedule: Schedule, num_stages: int, num_micro_batches: int):
  """Tasks per clock: a list of clocks, each a list of tasks (one per stage
  at most) whose dependencies finished on earlier clocks."""
  orders = stage_orders(schedule, num_stages, num_micro_batches)
  K = num_stages
  done: set = set()
  pos = [0] * K
  clocks = []
  while any(pos[s] < len(orders[s]) for s in range(K)):
    ready = []
    for s in range(K):
      if pos[s] >= len(orders[s]):
        continue
      kind, _, m = task = orders[s][pos[s]]
      if kind == "F":
        ok = s == 0 or ("F", s - 1, m) in done
      else:
        ok = ("F", s, m) in done and (s == K - 1 or ("B", s + 1, m) in done)
      if ok:
        ready.append(task)
    if not ready:  # pragma: no cover - the orders above never deadlock
      raise RuntimeError("pipeline schedule deadlocked")
    for task in ready:
      pos[task[1]] += 1
    done.update(ready)
    clocks.append(ready)
  return clocks
