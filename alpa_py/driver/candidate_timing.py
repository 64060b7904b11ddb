"""Timing compiled candidate programs on the devices with the call's own
arguments (``AutoShardingOption.measure_candidates``).

Each candidate runs on fresh copies of the arguments it donates, placed in
its own input layouts, so the caller's arrays are never donated or changed
and no step's result is kept. Candidates are timed in turn (A B C ...
A B C ..., after one warm-up step each), each step blocked on before the
next starts: a slow spell of a shared machine hits every candidate, and no
more than one step is ever in flight.
"""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import jax
import numpy as np

ROUNDS = 3


def concrete(leaves: Sequence) -> bool:
  """Whether the call's leaves are arrays (not abstract shapes) to run on."""
  return all(isinstance(x, (jax.Array, np.ndarray, np.generic, int, float,
                            bool, complex)) for x in leaves)


def _run_once(task, leaves, donated: frozenset, kept: list) -> float:
  args = [jax.device_put(x, s, may_alias=False) if i in donated else kept[i]
          for i, (x, s) in enumerate(zip(leaves, task.in_shardings))]
  jax.block_until_ready(args)
  t0 = time.perf_counter()
  outs = task.compiled(*args)
  jax.block_until_ready(outs)
  seconds = time.perf_counter() - t0
  del outs, args
  return seconds


def time_tasks(tasks: dict, leaves: Sequence, donated: Sequence[int],
               rounds: int = ROUNDS) -> dict:
  """Name -> median step seconds of each compiled ``Task`` in ``tasks``,
  run on ``leaves`` (the call's flat arguments; those at ``donated`` are
  copied for every step)."""
  donated = frozenset(donated)
  kept = {name: [None if i in donated else jax.device_put(x, s)
                 for i, (x, s) in enumerate(zip(leaves, task.in_shardings))]
          for name, task in tasks.items()}
  for name, task in tasks.items():
    _run_once(task, leaves, donated, kept[name])  # warm-up
  times: dict = {name: [] for name in tasks}
  for _ in range(rounds):
    for name, task in tasks.items():
      times[name].append(_run_once(task, leaves, donated, kept[name]))
  return {name: statistics.median(ts) for name, ts in times.items()}
