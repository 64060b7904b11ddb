"""Timing compiled candidate programs on the devices with the call's own
arguments (``AutoShardingOption.measure_candidates``).

Each candidate runs on fresh copies of the arguments it donates, placed in
its own input layouts, so the caller's arrays are never donated or changed
and no step's result is kept. Candidates are timed in turn, one step of
each per round (after one warm-up step each), each step blocked on before
the next starts: a slow spell of a shared machine hits every candidate, and
no more than one step is ever in flight. The order within a round is a
seeded shuffle, so that no candidate always runs right after the same one
(a step inherits its predecessor's deallocations and cache state), and
Python's garbage collector is paused during a round.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from typing import Callable, Sequence

import jax
import numpy as np

ROUNDS = 5
# candidates within this share of the fastest are timed again, longer
RACE_MARGIN = 0.10
RACE_ROUNDS = 10


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
  return interleaved_medians(
      {name: (lambda t=task, k=kept[name]: _run_once(t, leaves, donated, k))
       for name, task in tasks.items()}, rounds)


def interleaved_medians(steps: dict[str, Callable[[], float]], rounds: int,
                        seed: int = 0) -> dict:
  """Name -> median of ``rounds`` timings of ``steps[name]()`` (each call
  runs one blocked step and returns its seconds). One warm-up call each,
  then per round one call of each in a seeded shuffled order, with the
  garbage collector paused inside a round."""
  if rounds < 1:
    raise ValueError(f"rounds (={rounds!r}) must be >= 1")
  for fn in steps.values():
    fn()
  rng = random.Random(seed)
  names = list(steps)
  times: dict = {name: [] for name in names}
  enabled = gc.isenabled()
  try:
    for _ in range(rounds):
      gc.collect()
      gc.disable()
      for name in rng.sample(names, len(names)):
        times[name].append(steps[name]())
      if enabled:
        gc.enable()
  finally:
    if enabled:
      gc.enable()
  return {name: statistics.median(ts) for name, ts in times.items()}


def race(tasks: dict, leaves: Sequence, donated: Sequence[int],
         rounds: int = ROUNDS, margin: float = RACE_MARGIN,
         extra_rounds: int = RACE_ROUNDS) -> dict:
  """``time_tasks``, then the candidates within ``margin`` of the fastest
  timed again over ``extra_rounds`` rounds among themselves (a near-tie is
  decided by the longer run; the others keep their first medians)."""
  times = time_tasks(tasks, leaves, donated, rounds)
  best = min(times.values())
  close = {n: t for n, t in tasks.items() if times[n] <= (1 + margin) * best}
  if len(close) > 1 and extra_rounds > 0:
    times.update(time_tasks(close, leaves, donated, extra_rounds))
  return times
