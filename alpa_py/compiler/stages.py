"""Stage construction: layers -> pipeline stages on submeshes (Alpa's DP).

A stage is a contiguous range of layers on a submesh of the devices; the
stages together use every device. The pipeline's latency with B
micro-batches is sum(stage times) + (B - 1) * max(stage time). The DP
enumerates the bound t_max on a stage's time (each candidate stage time),
finds for it the cheapest split of layers into stages whose times stay under
t_max and whose devices add up to the total, and keeps the best total.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from typing import Callable, Sequence


# Both enums are str-valued, so that an option still compares equal to the
# string it was given (``option.cost_source == "model"``).
class SubmeshSpace(str, enum.Enum):
  """Candidate submesh sizes for the stage DP."""

  POWER_OF_TWO = "power_of_two"  # 1, 2, 4, ... devices
  ALL = "all"  # any divisor of the device count


class CostSource(str, enum.Enum):
  """Where the stage DP gets the time of a candidate stage."""

  PROFILE = "profile"  # compile and time it on its submesh
  MODEL = "model"  # the intra-op ILP's predicted time


def _parse(kind: type[enum.Enum], field: str, value):
  """``value`` (a member or its string) as a member of ``kind``."""
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f"{field} (={value!r}) must be one of "
                     f"{tuple(m.value for m in kind)}") from None


@dataclasses.dataclass(frozen=True)
class UniformStageOption:
  """Equal layer counts per stage, equal submeshes.

  Attributes:
    num_stages: number of stages (default: the number of layers).
    submesh_shape: physical shape of each stage's submesh (default
      ``(1, devices // num_stages)``); its logical mesh is the same.
  """

  num_stages: int | None = None
  submesh_shape: tuple[int, int] | None = None

  def __post_init__(self):
    if self.num_stages is not None and (not isinstance(self.num_stages, int)
                                        or self.num_stages < 1):
      raise ValueError(f"num_stages (={self.num_stages!r}) must be a positive int")
    if self.submesh_shape is not None:
      object.__setattr__(self, "submesh_shape", tuple(self.submesh_shape))


@dataclasses.dataclass(frozen=True)
class AutoStageOption:
  """Stages and submeshes chosen by the stage DP.

  Attributes:
    submesh_shape_space: ``power_of_two`` (submeshes of 1, 2, 4, ... devices)
      or ``all`` (any divisor of the device count); a ``SubmeshSpace`` or its
      string.
    cost_source: ``profile`` (compile and time each candidate stage on its
      submesh) or ``model`` (the intra-op ILP's predicted time); a
      ``CostSource`` or its string.
  """

  submesh_shape_space: SubmeshSpace = SubmeshSpace.POWER_OF_TWO
  cost_source: CostSource = CostSource.PROFILE

  def __post_init__(self):
    object.__setattr__(self, "submesh_shape_space",
                       _parse(SubmeshSpace, "submesh_shape_space",
                              self.submesh_shape_space))
    object.__setattr__(self, "cost_source",
                       _parse(CostSource, "cost_source", self.cost_source))


@dataclasses.dataclass(frozen=True)
class ManualStageOption:
  """Stages given by hand.

  Attributes:
    forward_stage_layer_ids: per stage, the layer ids it runs (contiguous).
    submesh_shapes: per stage, its physical submesh shape.
    submesh_logical_shapes: per stage, the logical mesh for the intra-op
      pass (default: the physical shape).
  """

  forward_stage_layer_ids: tuple
  submesh_shapes: tuple
  submesh_logical_shapes: tuple | None = None

  def __post_init__(self):
    ids = tuple(tuple(s) for s in self.forward_stage_layer_ids)
    shapes = tuple(tuple(s) for s in self.submesh_shapes)
    object.__setattr__(self, "forward_stage_layer_ids", ids)
    object.__setattr__(self, "submesh_shapes", shapes)
    if len(ids) != len(shapes):
      raise ValueError(f"forward_stage_layer_ids has {len(ids)} stages but "
                       f"submesh_shapes has {len(shapes)}")
    if self.submesh_logical_shapes is not None:
      logical = tuple(tuple(s) for s in self.submesh_logical_shapes)
      object.__setattr__(self, "submesh_logical_shapes", logical)
      if len(logical) != len(ids):
        raise ValueError(f"submesh_logical_shapes has {len(logical)} entries "
                         f"for {len(ids)} stages")
      for phys, log in zip(shapes, logical):
        if math.prod(phys) != math.prod(log):
          raise ValueError(f"logical shape {log} does not have the "
                           f"{math.prod(phys)} devices of submesh {phys}")
    flat = [l for s in ids for l in s]
    if flat != list(range(len(flat))):
      raise ValueError(f"forward_stage_layer_ids (={ids}) must cover layers "
                       "0..L-1 in order, each stage a contiguous range")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage: its layers and devices."""

  layers: tuple[int, int]  # [start, end)
  submesh_shape: tuple[int, int]
  logical_shape: tuple[int, ...]
  device_range: tuple[int, int]  # [start, end) into the device list


def submesh_choices(num_devices: int,
                    space: SubmeshSpace) -> list[tuple[int, int]]:
  """Candidate physical submeshes on one host: (1, d)."""
  if space == SubmeshSpace.POWER_OF_TWO:
    sizes = [1 << k for k in range(num_devices.bit_length())
             if (1 << k) <= num_devices]
  else:
    sizes = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  return [(1, d) for d in sizes]


def stage_dp(num_layers: int, num_devices: int, sizes: Sequence[int],
             cost: Callable[[int, int, int], float], num_micro_batches: int):
  """The stage-construction DP.

  Args:
    num_layers: L.
    num_devices: devices to use, all of them.
    sizes: candidate submesh sizes (devices per stage).
    cost: cost(i, j, size) -> seconds of layers [i, j) on a submesh of that
      size (math.inf if it does not fit).
    num_micro_batches: B.

  Returns:
    (latency, [(i, j, size), ...]) or (math.inf, None) if nothing fits.
  """
  table = {}
  for i in range(num_layers):
    for j in range(i + 1, num_layers + 1):
      for s in sizes:
        table[(i, j, s)] = cost(i, j, s)
  candidates = sorted({c for c in table.values() if c < math.inf})
  best_total, best_plan = math.inf, None
  for t_max in candidates:
    # f[i][d]: cheapest sum of stage times for layers [i, L) on d devices
    f = [[math.inf] * (num_devices + 1) for _ in range(num_layers + 1)]
    nxt = [[None] * (num_devices + 1) for _ in range(num_layers + 1)]
    f[num_layers][0] = 0.0
    for i in range(num_layers - 1, -1, -1):
      for d in range(1, num_devices + 1):
        for j in range(i + 1, num_layers + 1):
          for s in sizes:
            if s > d:
              continue
            c = table[(i, j, s)]
            if c > t_max or f[j][d - s] == math.inf:
              continue
            v = c + f[j][d - s]
            if v < f[i][d]:
              f[i][d], nxt[i][d] = v, (j, s)
    if f[0][num_devices] == math.inf:
      continue
    plan, i, d = [], 0, num_devices
    while i < num_layers:
      j, s = nxt[i][d]
      plan.append((i, j, s))
      i, d = j, d - s
    actual_max = max(table[p] for p in plan)
    total = f[0][num_devices] + (num_micro_batches - 1) * actual_max
    if total < best_total - 1e-15:
      best_total, best_plan = total, plan
  return best_total, best_plan


def stage_brute_force(num_layers, num_devices, sizes, cost, num_micro_batches):
  """Exhaustive search over splits (for tests)."""
  best = (math.inf, None)
  for k in range(1, num_layers + 1):
    for cuts in itertools.combinations(range(1, num_layers), k - 1):
      bounds = (0,) + cuts + (num_layers,)
      for alloc in itertools.product(sizes, repeat=k):
        if sum(alloc) != num_devices:
          continue
        plan = [(bounds[x], bounds[x + 1], alloc[x]) for x in range(k)]
        costs = [cost(*p) for p in plan]
        if any(c == math.inf for c in costs):
          continue
        total = sum(costs) + (num_micro_batches - 1) * max(costs)
        if total < best[0] - 1e-15:
          best = (total, plan)
  return best
