"""What ``get_executable`` returns: a compiled step with its printable plan."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """Layout of one step input or output."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  spec: PartitionSpec


@dataclasses.dataclass(frozen=True)
class OpPlan:
  """The strategy chosen for one dot/conv op."""

  index: int
  primitive: str
  shapes: str
  strategy: str
  out_spec: PartitionSpec


@dataclasses.dataclass(frozen=True)
class SolveStats:
  """How the ILP went (for the chosen mesh; candidates lists all meshes)."""

  status: str
  objective: float
  num_variables: int
  num_constraints: int
  solve_seconds: float
  num_nodes: int
  num_edges: int
  mesh_candidates: tuple[tuple[tuple[int, ...], float], ...]
  compile_seconds: float = 0.0

  @property
  def optimal(self) -> bool:
    return self.status == "OPTIMAL"


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A frozen, printable sharding plan.

  Attributes:
    method: the method's class name.
    mesh_shape: logical mesh shape.
    axis_names: mesh axis names (``x``, ``y``).
    inputs: layout of every flat input.
    outputs: layout of every flat output.
    ops: strategy of every dot_general / conv op.
    num_micro_batches: gradient-accumulation steps (1: none).
    cost_profile: the profile the costs come from.
    predicted_step_seconds: the ILP objective.
    estimated_peak_bytes: the ILP's estimate of peak bytes per device.
  """

  method: str
  mesh_shape: tuple[int, ...]
  axis_names: tuple[str, ...]
  inputs: tuple[TensorPlan, ...]
  outputs: tuple[TensorPlan, ...]
  ops: tuple[OpPlan, ...]
  num_micro_batches: int
  cost_profile: str
  predicted_step_seconds: float
  estimated_peak_bytes: float

  def input_spec(self, name_fragment: str) -> PartitionSpec:
    """The spec of the first input whose name contains ``name_fragment``."""
    for t in self.inputs:
      if name_fragment in t.name:
        return t.spec
    raise KeyError(f"no input named like {name_fragment!r}; inputs: "
                   f"{[t.name for t in self.inputs]}")

  def __str__(self) -> str:
    lines = [f"ShardingPlan({self.method}) on mesh {self.mesh_shape} "
             f"axes {self.axis_names}, micro-batches {self.num_micro_batches}, "
             f"profile {self.cost_profile}",
             f"  predicted step {self.predicted_step_seconds * 1e3:.3f} ms, "
             f"estimated peak {self.estimated_peak_bytes / 2**20:.2f} MiB/device"]
    for title, rows in (("inputs", self.inputs), ("outputs", self.outputs)):
      lines.append(f"  {title}:")
      for t in rows:
        lines.append(f"    {t.name:<48} {str(t.shape):<18} {t.dtype:<8} "
                     f"{t.spec}")
    lines.append("  dot/conv ops:")
    for o in self.ops:
      lines.append(f"    #{o.index:<5} {o.primitive:<20} {o.shapes:<36} "
                   f"{o.strategy:<28} -> {o.out_spec}")
    return "\n".join(lines)


class Executable:
  """A compiled, sharded step.

  Attributes:
    plan: the ``ShardingPlan``.
    mesh: the ``jax.sharding.Mesh`` it runs on.
    solve_stats: the ILP's ``SolveStats``.
  """

  def __init__(self, compiled, plan: ShardingPlan, mesh, solve_stats,
               in_shardings, out_tree, runner: Callable | None = None):
    self._compiled = compiled
    self.plan = plan
    self.mesh = mesh
    self.solve_stats = solve_stats
    self.in_shardings = tuple(in_shardings)
    self._out_tree = out_tree
    self._block = all(d.platform == "cpu" for d in mesh.devices.flat)

  def call_flat(self, leaves) -> Any:
    """Runs on flat inputs; returns the output pytree."""
    placed = []
    for x, s in zip(leaves, self.in_shardings):
      if not (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)):
        x = jax.device_put(x, s)
      placed.append(x)
    outs = self._compiled(*placed)
    if self._block:
      # XLA's CPU collectives stall when many sharded steps are in flight.
      jax.block_until_ready(outs)
    return jax.tree_util.tree_unflatten(self._out_tree, outs)

  def hlo_text(self) -> str:
    """The optimized (partitioned) HLO."""
    return self._compiled.as_text()

  def memory_analysis(self):
    return self._compiled.memory_analysis()

  def memory_per_device(self) -> int:
    """Peak bytes per device from XLA: arguments + outputs + temps - aliased."""
    m = self._compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)

  def __repr__(self) -> str:
    return f"<alpa_py.Executable mesh={self.plan.mesh_shape} {self.plan.method}>"
