"""Parallelization methods and their options (frozen, hashable, validated).

``ShardParallel`` runs the intra-operator pass with the full strategy space.
``DataParallel``, ``Zero2Parallel`` and ``Zero3Parallel`` are the same pass with
the layouts of the step's inputs fixed: the batch split on dim 0 over all
devices, and parameters / optimizer state replicated or sharded on their
largest divisible dim. The ILP still chooses everything inside the step.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Sequence

from alpa_py.compiler.cluster_env import mesh_factorizations
from alpa_py.compiler.layers import AutoLayerOption, ManualLayerOption
from alpa_py.compiler.schedules import Schedule
from alpa_py.compiler.stages import (AutoStageOption, ManualStageOption,
                                     UniformStageOption)
from alpa_py.compiler.options import AutoShardingOption as AutoShardingOption


class InputLayout(enum.Enum):
  """How a method fixes the layout of the step's inputs."""

  AUTO = "auto"  # the ILP chooses
  DATA_PARALLEL = "data_parallel"  # batch split, state replicated
  ZERO2 = "zero2"  # batch split, params replicated, optimizer state sharded
  ZERO3 = "zero3"  # batch split, params and optimizer state sharded
  # batch split on mesh axis 0; every parameter and optimizer state array
  # sharded on the last axis, the ILP choosing which dim (Megatron-style
  # tensor parallelism where the model has that structure). A candidate of
  # the compiled-cost selection, not a method of its own.
  TENSOR_PARALLEL = "tensor_parallel"


def _freeze_devices(devices):
  if devices is None:
    return None
  devices = tuple(devices)
  if not devices:
    raise ValueError("devices (=()) must name at least one device")
  return devices


def _check_link_costs(costs, mesh_shape):
  if mesh_shape is None:
    raise ValueError("mesh_link_costs needs mesh_shape: it gives one (alpha, "
                     "beta) pair per mesh axis")
  try:
    costs = tuple((float(a), float(b)) for a, b in costs)
  except (TypeError, ValueError):
    raise ValueError(f"mesh_link_costs (={costs!r}) must hold one (alpha "
                     "seconds, beta seconds/byte) pair per mesh axis") from None
  if len(costs) != len(mesh_shape):
    raise ValueError(f"mesh_link_costs has {len(costs)} pair(s) but "
                     f"mesh_shape {mesh_shape} has {len(mesh_shape)} axes; "
                     "give one (alpha, beta) pair per axis")
  if any(a < 0 or b < 0 for a, b in costs):
    raise ValueError(f"mesh_link_costs (={costs}) must be non-negative")
  return costs


@dataclasses.dataclass(frozen=True)
class ShardParallel:
  """Intra-operator parallelism chosen by the ILP on one device mesh.

  Attributes:
    devices: devices to use (default: all devices of the current cluster).
    mesh_shape: logical mesh, e.g. ``(2, 4)`` or ``(8,)``; None tries each
      2-D factorization of the device count and keeps the lowest objective.
    num_micro_batches: if set, the batch arguments are split along dim 0 and
      gradients (marked with ``alpa_py.grad``/``value_and_grad``) accumulated.
    auto_sharding_option: pass options.
    mesh_link_costs: per axis of ``mesh_shape``, the (alpha seconds,
      beta seconds per byte) of its links, e.g. ``((5e-6, 1 / 12.5e9),
      (1e-6, 1 / 150e9))`` for an inter-node and an intra-node axis
      (Alpa's ``mesh_alpha`` / ``mesh_beta``). None: from the cost profile.
  """

  devices: Sequence[Any] | None = None
  mesh_shape: tuple[int, ...] | None = None
  num_micro_batches: int | None = None
  auto_sharding_option: AutoShardingOption | None = None
  mesh_link_costs: tuple[tuple[float, float], ...] | None = None

  input_layout = InputLayout.AUTO

  def __post_init__(self):
    object.__setattr__(self, "devices", _freeze_devices(self.devices))
    if self.mesh_shape is not None:
      shape = tuple(self.mesh_shape)
      if not 1 <= len(shape) <= 2 or any(
          not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"mesh_shape (={self.mesh_shape!r}) must be a tuple "
                         "of one or two positive ints, e.g. (8,) or (2, 4)")
      object.__setattr__(self, "mesh_shape", shape)
    n = self.num_micro_batches
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
      raise ValueError(f"num_micro_batches (={n!r}) must be a positive int or "
                       "None")
    if self.mesh_link_costs is not None:
      object.__setattr__(self, "mesh_link_costs",
                         _check_link_costs(self.mesh_link_costs,
                                           self.mesh_shape))
    if self.auto_sharding_option is None:
      object.__setattr__(self, "auto_sharding_option", AutoShardingOption())
    elif not isinstance(self.auto_sharding_option, AutoShardingOption):
      raise TypeError("auto_sharding_option must be an AutoShardingOption, got "
                      f"{type(self.auto_sharding_option).__name__}")

  @property
  def layout(self) -> InputLayout:
    if self.auto_sharding_option.force_data_parallel:
      return InputLayout.DATA_PARALLEL
    return self.input_layout

  @property
  def splits_batch(self) -> bool:
    """Whether the batch arguments change the compiled step: split into
    micro-batches, or kept on the data axes (a data-parallel layout or
    ``force_batch_dim_to_mesh_dim``). Otherwise they only guide the plan."""
    return ((self.num_micro_batches or 1) > 1
            or self.layout is not InputLayout.AUTO
            or self.auto_sharding_option.force_batch_dim_to_mesh_dim
            is not None)

  def mesh_shapes(self, num_devices: int) -> list[tuple[int, ...]]:
    """The logical mesh shapes to try on ``num_devices`` devices."""
    if self.mesh_shape is not None:
      if math.prod(self.mesh_shape) != num_devices:
        raise ValueError(f"mesh_shape (={self.mesh_shape}) has "
                         f"{math.prod(self.mesh_shape)} devices but "
                         f"{num_devices} devices are used; pass a shape whose "
                         "product is the device count, or pick devices=")
      return [self.mesh_shape]
    if self.layout is not InputLayout.AUTO:
      return [(num_devices,)]
    return mesh_factorizations(num_devices)


@dataclasses.dataclass(frozen=True)
class DataParallel(ShardParallel):
  """Batch split over all devices; parameters and optimizer state replicated."""

  input_layout = InputLayout.DATA_PARALLEL


@dataclasses.dataclass(frozen=True)
class Zero2Parallel(ShardParallel):
  """Data parallel with optimizer state sharded (gradients reduce-scattered)."""

  input_layout = InputLayout.ZERO2

  def __post_init__(self):
    super().__post_init__()
    opt = dataclasses.replace(self.auto_sharding_option,
                              prefer_reduce_scatter=True)
    object.__setattr__(self, "auto_sharding_option", opt)


@dataclasses.dataclass(frozen=True)
class Zero3Parallel(Zero2Parallel):
  """Data parallel with parameters and optimizer state sharded."""

  input_layout = InputLayout.ZERO3


@dataclasses.dataclass(frozen=True)
class PipeshardParallel:
  """Inter-operator (pipeline) + intra-operator parallelism.

  The step is cut into layers (``layer_option``), the layers into stages on
  submeshes (``stage_option``), and micro-batches flow through the stages
  with a GPipe or 1F1B schedule; inside each stage the intra-op ILP shards
  the work over its submesh. The optimizer update runs once per step.

  Attributes:
    devices: devices to use (default: all).
    num_micro_batches: micro-batches per step (must divide the batch).
    layer_option: ``ManualLayerOption()`` (default) or ``AutoLayerOption``.
    stage_option: ``UniformStageOption()`` (default), ``AutoStageOption`` or
      ``ManualStageOption``.
    pipeline_schedule: ``"1f1b"`` (default) or ``"gpipe"``.
    default_auto_sharding_option: options of every stage's intra-op pass.
  """

  devices: Sequence[Any] | None = None
  num_micro_batches: int = 1
  layer_option: ManualLayerOption | AutoLayerOption | None = None
  stage_option: (UniformStageOption | AutoStageOption | ManualStageOption
                 | None) = None
  pipeline_schedule: Schedule | str = Schedule.ONE_F_ONE_B
  default_auto_sharding_option: AutoShardingOption | None = None

  # micro-batches flow through the stages; stages may be data parallel
  splits_batch = True

  def __post_init__(self):
    object.__setattr__(self, "devices", _freeze_devices(self.devices))
    n = self.num_micro_batches
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
      raise ValueError(f"num_micro_batches (={n!r}) must be a positive int")
    if self.layer_option is None:
      object.__setattr__(self, "layer_option", ManualLayerOption())
    elif not isinstance(self.layer_option, (ManualLayerOption, AutoLayerOption)):
      raise TypeError("layer_option must be ManualLayerOption or "
                      f"AutoLayerOption, got {self.layer_option!r}")
    if self.stage_option is None:
      object.__setattr__(self, "stage_option", UniformStageOption())
    elif not isinstance(self.stage_option, (UniformStageOption, AutoStageOption,
                                            ManualStageOption)):
      raise TypeError("stage_option must be UniformStageOption, "
                      f"AutoStageOption or ManualStageOption, got "
                      f"{self.stage_option!r}")
    object.__setattr__(self, "pipeline_schedule",
                       Schedule.parse(self.pipeline_schedule))
    if self.default_auto_sharding_option is None:
      object.__setattr__(self, "default_auto_sharding_option",
                         AutoShardingOption())
    elif not isinstance(self.default_auto_sharding_option, AutoShardingOption):
      raise TypeError("default_auto_sharding_option must be an "
                      "AutoShardingOption")
