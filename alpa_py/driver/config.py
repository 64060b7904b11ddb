"""A method, resolved once into the frozen configuration of one compile.

``ShardParallel`` and its constrained variants are read here and nowhere
else in a compile: the input layout policy, the candidate meshes, the pass
options and the micro-batch count become one ``ShardConfig``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from alpa_py.compiler.options import AutoShardingOption
from alpa_py.methods import InputLayout, ShardParallel


@dataclasses.dataclass(frozen=True)
class ShardConfig:
  """Everything the ShardParallel passes read about the method.

  Attributes:
    method_name: the method's class name (shown in the plan).
    layout: how the method fixes the inputs' layouts.
    mesh_shapes: the logical meshes to try.
    option: the intra-op pass options; a constrained method sets
      ``force_data_parallel`` here (every op's batch dim on the data axes).
    num_micro_batches: gradient-accumulation steps (1: none).
    link_costs: per mesh axis (alpha, beta), or None for the profile's.
    mesh_fixed: the method named its mesh shape (no other mesh is tried).
    propagate: pin only the step's inputs and outputs to the ILP's layouts
      and leave the intermediates to XLA's sharding propagation (a
      compiled-cost selection candidate; the plan then promises no per-op
      collectives).
    runner_up_of: a solution of this step whose layouts of the heaviest
      inputs the ILP may not take (``layout.runner_up_exclusions``: a
      compiled-cost selection candidate).
    replicate_light: with ``runner_up_of``, the non-batch inputs below the
      heaviest are replicated (``layout.light_replicated``).
  """

  method_name: str
  layout: InputLayout
  mesh_shapes: tuple[tuple[int, ...], ...]
  option: AutoShardingOption
  num_micro_batches: int
  link_costs: tuple[tuple[float, float], ...] | None = None
  mesh_fixed: bool = False
  propagate: bool = False
  runner_up_of: Any = None  # a ShardingSolution
  replicate_light: bool = False

  @classmethod
  def resolve(cls, method: ShardParallel, num_devices: int) -> "ShardConfig":
    """Reads ``method`` for a compile on ``num_devices`` devices."""
    option = method.auto_sharding_option
    if method.layout is not InputLayout.AUTO and \
        option.force_batch_dim_to_mesh_dim is None:
      # a data-parallel method's promise covers the whole step: every op's
      # batch dim on the data axes (all of them), not only the inputs'
      option = dataclasses.replace(option, force_data_parallel=True)
    return cls(type(method).__name__, method.layout,
               tuple(method.mesh_shapes(num_devices)), option,
               method.num_micro_batches or 1, method.mesh_link_costs,
               method.mesh_shape is not None)

  @property
  def forbidden_collectives(self) -> frozenset[str]:
    """Collective kinds the options forbid (priced, not removed)."""
    o = self.option
    return frozenset(k for k, allowed in (("all-gather", o.allow_all_gather),
                                          ("all-to-all", o.allow_all_to_all))
                     if not allowed)

  @property
  def forces_batch_dim(self) -> bool:
    o = self.option
    return o.force_batch_dim_to_mesh_dim is not None or o.force_data_parallel

  @property
  def memory_budget(self) -> float | None:
    return self.option.memory_budget_per_device
