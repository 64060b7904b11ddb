"""A method, resolved once into the frozen configuration of one compile.

``ShardParallel`` and its constrained variants are read here and nowhere
else in a compile: the input layout policy, the candidate meshes, the pass
options and the micro-batch count become one ``ShardConfig``.
"""

from __future__ import annotations

import dataclasses

from alpa_py.compiler.options import AutoShardingOption
from alpa_py.methods import InputLayout, ShardParallel


@dataclasses.dataclass(frozen=True)
class ShardConfig:
  """Everything the ShardParallel passes read about the method.

  Attributes:
    method_name: the method's class name (shown in the plan).
    layout: how the method fixes the inputs' layouts.
    mesh_shapes: the logical meshes to try.
    option: the intra-op pass options.
    num_micro_batches: gradient-accumulation steps (1: none).
  """

  method_name: str
  layout: InputLayout
  mesh_shapes: tuple[tuple[int, ...], ...]
  option: AutoShardingOption
  num_micro_batches: int

  @classmethod
  def resolve(cls, method: ShardParallel, num_devices: int) -> "ShardConfig":
    """Reads ``method`` for a compile on ``num_devices`` devices."""
    return cls(type(method).__name__, method.layout,
               tuple(method.mesh_shapes(num_devices)),
               method.auto_sharding_option, method.num_micro_batches or 1)

  @property
  def memory_budget(self) -> float | None:
    return self.option.memory_budget_per_device
