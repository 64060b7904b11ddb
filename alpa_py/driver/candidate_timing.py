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

A few rounds rank every candidate; the candidates near the fastest are then
raced among themselves in further rounds, their samples pooled with the
earlier ones, the margin narrowing at each stage (``race``): on a shared
machine one slow spell can put a candidate 15-20% behind in five rounds.
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
# at each stage of the race, the candidates within this share of the
# fastest pooled median are timed again, RACE_ROUNDS more rounds
RACE_MARGINS = (0.20, 0.05)
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
               rounds: int = ROUNDS, seed: int = 0) -> dict:
  """Name -> the step seconds of each of ``rounds`` rounds, for each
  compiled ``Task`` in ``tasks``, run on ``leaves`` (the call's flat
  arguments; those at ``donated`` are copied for every step)."""
  donated = frozenset(donated)
  kept = {name: [None if i in donated else jax.device_put(x, s)
                 for i, (x, s) in enumerate(zip(leaves, task.in_shardings))]
          for name, task in tasks.items()}
  return interleaved_samples(
      {name: (lambda t=task, k=kept[name]: _run_once(t, leaves, donated, k))
       for name, task in tasks.items()}, rounds, seed)


def interleaved_medians(steps: dict[str, Callable[[], float]], rounds: int,
                        seed: int = 0) -> dict:
  """Name -> median of ``rounds`` timings of ``steps[name]()`` (each call
  runs one blocked step and returns its seconds); see
  ``interleaved_samples``."""
  return {name: statistics.median(ts) for name, ts in
          interleaved_samples(steps, rounds, seed).items()}


def interleaved_samples(steps: dict[str, Callable[[], float]], rounds: int,
                        seed: int = 0) -> dict[str, list[float]]:
  """Name -> the ``rounds`` timings of ``steps[name]()``. One warm-up call
  each, then per round one call of each in a seeded shuffled order, with
  the garbage collector paused inside a round."""
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
  return times


def race(tasks: dict, leaves: Sequence, donated: Sequence[int],
         rounds: int = ROUNDS, margins: Sequence[float] = RACE_MARGINS,
         extra_rounds: int = RACE_ROUNDS) -> dict:
  """Name -> median step seconds of each task: ``rounds`` rounds of every
  task, then, for each margin in turn, ``extra_rounds`` more rounds of the
  tasks whose pooled median is within that share of the fastest one's
  (a near-tie is decided by the longer run; the others keep the medians
  of the rounds they ran)."""
  samples = time_tasks(tasks, leaves, donated, rounds)
  for stage, margin in enumerate(margins, 1):
    medians = {n: statistics.median(ts) for n, ts in samples.items()}
    best = min(medians.values())
    close = {n: t for n, t in tasks.items()
             if medians[n] <= (1 + margin) * best}
    if len(close) < 2 or extra_rounds < 1:
      break
    more = time_tasks(close, leaves, donated, extra_rounds, seed=stage)
    for n, ts in more.items():
      samples[n].extend(ts)
  return {n: statistics.median(ts) for n, ts in samples.items()}
