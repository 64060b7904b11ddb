"""The printable plan of a pipelined step."""

from __future__ import annotations

import dataclasses

from alpa_py.executable import ShardingPlan, TensorPlan


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One pipeline stage.

  Attributes:
    index: stage number.
    layers: [start, end) layer ids.
    submesh_shape: physical submesh.
    logical_shape: logical mesh of its intra-op plan.
    device_ids: its devices.
    num_forward_ops, num_backward_ops: ops in its two programs.
    predicted_seconds: the intra-op ILP's objective (fwd + bwd, one
      micro-batch).
    inputs: layout of every tensor the stage reads.
    strategies: (primitive, strategy) of each dot/conv in the stage.
  """

  index: int
  layers: tuple[int, int]
  submesh_shape: tuple[int, ...]
  logical_shape: tuple[int, ...]
  device_ids: tuple[int, ...]
  num_forward_ops: int
  num_backward_ops: int
  predicted_seconds: float
  inputs: tuple[TensorPlan, ...]
  strategies: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class PipeshardPlan:
  """Stages, schedule and the update's sharding plan."""

  stages: tuple[StagePlan, ...]
  schedule: tuple[str, ...]  # one line of tasks per clock
  schedule_name: str
  num_micro_batches: int
  num_layers: int
  layer_flops: tuple[float, ...]
  update_plan: ShardingPlan
  compile_report: tuple  # (name, value) pairs: seconds spent per phase

  def __str__(self) -> str:
    lines = [f"PipeshardPlan: {len(self.stages)} stages over {self.num_layers} "
             f"layers, {self.num_micro_batches} micro-batches, schedule "
             f"{self.schedule_name}"]
    for s in self.stages:
      lines.append(
          f"  stage {s.index}: layers {s.layers[0]}-{s.layers[1] - 1}, devices "
          f"{list(s.device_ids)} submesh {s.submesh_shape} logical "
          f"{s.logical_shape}, {s.num_forward_ops} fwd + {s.num_backward_ops} "
          f"bwd ops, predicted {s.predicted_seconds * 1e3:.3f} ms/micro-batch")
      for prim, strat in s.strategies:
        lines.append(f"      {prim:<20} {strat}")
    lines.append("  schedule (one clock per line):")
    lines.extend(f"    {c}" for c in self.schedule)
    lines.append(f"  update on mesh {self.update_plan.mesh_shape}")
    if self.compile_report:
      lines.append("  compile: " + ", ".join(
          f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
          for k, v in self.compile_report))
    return "\n".join(lines)
