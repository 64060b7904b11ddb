"""The printable values a compile produces: sharding plans, pipeline plans,
solver statistics, and the function that builds a ``ShardingPlan`` from an
ILP solution."""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec

from alpa_py.compiler.auto_sharding import ShardingSolution
from alpa_py.compiler.graph import OpGraph
from alpa_py.compiler.lowering import tensor_spec
from alpa_py.compiler.strategies.registry import is_heavy
from alpa_py.compiler.strategies.spec import to_partition_spec


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  """Layout of one step input or output."""

  name: str
  shape: tuple[int, ...]
  dtype: str
  spec: PartitionSpec


@dataclasses.dataclass(frozen=True)
class OpPlan:
  """The strategy chosen for one dot/conv op.

  ``trips``: how many times it runs per step (> 1 inside a scan's body,
  where one strategy serves every iteration).
  """

  index: int
  primitive: str
  shapes: str
  strategy: str
  out_spec: PartitionSpec
  trips: int = 1


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
    ops: strategy of every dot_general / conv op (those in scans' bodies
      too, once each, with how often they run).
    num_micro_batches: gradient-accumulation steps (1: none).
    cost_profile: the profile the costs come from.
    predicted_step_seconds: the ILP objective.
    estimated_peak_bytes: the ILP's estimate of peak bytes per device.
    predicted_collectives: (kind, count) the plan implies, as XLA's
      combiners would merge them.
    compiled_collectives: (kind, count) in the compiled step's HLO (empty
      where not counted, e.g. for an accumulating step).
    compiled_step_seconds: the profile's price of the compiled program
      (``program_cost``), where the plan was chosen by it.
    alternatives: (candidate, compiled price in seconds) of every program
      compared with ``select_by_compiled_cost``, this one included.
    measured: (candidate, median measured step seconds) of the candidates
      timed on the devices (``AutoShardingOption.measure_candidates``);
      where present, the fastest of them was kept.
    propagated: only the inputs and outputs are pinned to the plan; XLA's
      sharding propagation laid out the intermediates (``ops`` shows the
      ILP's strategies, which XLA was free to change), so no per-op
      collectives are promised.
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
  predicted_collectives: tuple[tuple[str, int], ...] = ()
  compiled_collectives: tuple[tuple[str, int], ...] = ()
  compiled_step_seconds: float | None = None
  alternatives: tuple[tuple[str, float], ...] = ()
  measured: tuple[tuple[str, float], ...] = ()
  propagated: bool = False

  @property
  def collective_mismatch(self) -> dict[str, tuple[int, int]]:
    """Kind -> (predicted, compiled) where the two differ."""
    if not self.compiled_collectives:
      return {}
    p, c = dict(self.predicted_collectives), dict(self.compiled_collectives)
    return {k: (p.get(k, 0), c.get(k, 0)) for k in sorted(set(p) | set(c))
            if p.get(k, 0) != c.get(k, 0)}

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
    if self.alternatives:
      lines.append(f"  compiled program priced {self.compiled_step_seconds * 1e3:.3f}"
                   " ms; chosen by compiled price among: " + ", ".join(
                       f"{name} {sec * 1e3:.3f} ms"
                       for name, sec in self.alternatives))
    if self.measured:
      lines.append("  kept the fastest measured (median step on the devices): "
                   + ", ".join(f"{name} {sec * 1e3:.3f} ms"
                               for name, sec in self.measured))
    if self.propagated:
      lines.append("  intermediates: laid out by XLA's sharding propagation "
                   "from the planned inputs and outputs (the op strategies "
                   "below are the ILP's, not pinned)")
    if self.predicted_collectives:
      lines.append("  collectives (predicted / compiled): " + ", ".join(
          f"{k} {n}/{dict(self.compiled_collectives).get(k, '-')}"
          for k, n in self.predicted_collectives
          if n or dict(self.compiled_collectives).get(k)) + (
              "" if not self.collective_mismatch else "   MISMATCH"))
    for title, rows in (("inputs", self.inputs), ("outputs", self.outputs)):
      lines.append(f"  {title}:")
      for t in rows:
        lines.append(f"    {t.name:<48} {str(t.shape):<18} {t.dtype:<8} "
                     f"{t.spec}")
    lines.append("  dot/conv ops:")
    for o in self.ops:
      lines.append(f"    #{o.index:<5} {o.primitive:<20} {o.shapes:<36} "
                   f"{o.strategy:<28} -> {o.out_spec}"
                   + (f"  (x{o.trips}, in a scan)" if o.trips > 1 else ""))
    return "\n".join(lines)


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
    gradient_reduction: under ``force_data_parallel``, when the stage
      reduces its gradients over its devices ("once per step", or "per
      micro-batch" and why); empty otherwise.
    num_recomputed_ops: with ``remat_layer``, the forward ops its backward
      runs again (counted in ``num_backward_ops`` and, once more, in
      ``predicted_seconds``).
    num_residuals: with ``remat_layer``, the forward values (its layers'
      inputs) it keeps between its forward and its backward.
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
  gradient_reduction: str = ""
  num_recomputed_ops: int = 0
  num_residuals: int = 0


@dataclasses.dataclass(frozen=True)
class PipeshardPlan:
  """Stages, schedule and the update's sharding plan.

  ``remat_layer``: each stage's backward recomputes its layers' forward
  (``compiler/remat.py``).
  """

  stages: tuple[StagePlan, ...]
  schedule: tuple[str, ...]  # one line of tasks per clock
  schedule_name: str
  num_micro_batches: int
  num_layers: int
  layer_flops: tuple[float, ...]
  update_plan: ShardingPlan | None  # None: each stage updates its own
  compile_report: tuple  # (name, value) pairs: seconds spent per phase
  remat_layer: bool = False
  update_notes: tuple[str, ...] = ()  # how the update runs, and why

  def __str__(self) -> str:
    lines = [f"PipeshardPlan: {len(self.stages)} stages over {self.num_layers} "
             f"layers, {self.num_micro_batches} micro-batches, schedule "
             f"{self.schedule_name}"
             + (", remat_layer on (each layer's forward recomputed in the "
                "backward)" if self.remat_layer else "")]
    for s in self.stages:
      lines.append(
          f"  stage {s.index}: layers {s.layers[0]}-{s.layers[1] - 1}, devices "
          f"{list(s.device_ids)} submesh {s.submesh_shape} logical "
          f"{s.logical_shape}, {s.num_forward_ops} fwd + {s.num_backward_ops} "
          f"bwd ops, predicted {s.predicted_seconds * 1e3:.3f} ms/micro-batch")
      if s.gradient_reduction:
        lines.append(f"      gradients reduced {s.gradient_reduction}")
      if self.remat_layer:
        lines.append(f"      remat: backward recomputes {s.num_recomputed_ops} "
                     f"forward ops, keeps {s.num_residuals} layer inputs")
      for prim, strat in s.strategies:
        lines.append(f"      {prim:<20} {strat}")
    lines.append("  schedule (one clock per line):")
    lines.extend(f"    {c}" for c in self.schedule)
    if self.update_plan is not None:
      lines.append(f"  update on mesh {self.update_plan.mesh_shape}")
    lines.extend(f"  {note}" for note in self.update_notes)
    if self.compile_report:
      lines.append("  compile: " + ", ".join(
          f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
          for k, v in self.compile_report))
    return "\n".join(lines)


def _shapes_str(graph: OpGraph, op) -> str:
  parts = []
  for t in op.inputs:
    if isinstance(t, int):
      info = graph.tensor(t)
      parts.append(f"{info.dtype}{list(info.shape)}")
  return " x ".join(parts)


def make_plan(graph: OpGraph, sol: ShardingSolution, paths, out_count,
              method_name: str, cost_profile: str, mesh, num_micro_batches=1,
              out_names=None, input_shapes=None,
              collectives: tuple[dict, dict] | None = None,
              propagated: bool = False) -> ShardingPlan:
  names = mesh.axis_names
  input_shapes = input_shapes or [graph.tensor(t).shape for t in graph.invars]
  inputs = tuple(
      TensorPlan(path, shape, str(graph.tensor(t).dtype),
                 to_partition_spec(tensor_spec(graph, sol, t), names))
      for path, t, shape in zip(paths, graph.invars, input_shapes))
  outputs = []
  for k, ref in enumerate(graph.outvars[:out_count]):
    spec = tensor_spec(graph, sol, ref)
    if isinstance(ref, int):
      info = graph.tensor(ref)
      shape, dtype = info.shape, str(info.dtype)
    else:
      shape, dtype = (), type(ref.value).__name__
    name = out_names[k] if out_names else f"out{k}"
    outputs.append(TensorPlan(name, shape, dtype, to_partition_spec(spec, names)))
  ops = []
  for op in graph.all_ops():  # scans' bodies included
    if is_heavy(op.name):
      out_t = op.outputs[0]
      ops.append(OpPlan(op.index, op.name, _shapes_str(graph, op),
                        sol.strategy_of.get(op.index, "follows operand"),
                        to_partition_spec(tensor_spec(graph, sol, out_t), names),
                        op.trips))
  return ShardingPlan(
      method=method_name, mesh_shape=sol.mesh_shape,
      axis_names=tuple(names), inputs=inputs, outputs=tuple(outputs),
      ops=tuple(ops), num_micro_batches=num_micro_batches,
      cost_profile=cost_profile,
      predicted_step_seconds=sol.objective,
      estimated_peak_bytes=sol.estimated_peak_bytes,
      predicted_collectives=tuple(collectives[0].items()) if collectives else (),
      compiled_collectives=tuple(collectives[1].items()) if collectives
      else (), propagated=propagated)


def solve_stats(sol: ShardingSolution, candidates, compile_s=0.0) -> SolveStats:
  return SolveStats(status=sol.status, objective=sol.objective,
                    num_variables=sol.num_variables,
                    num_constraints=sol.num_constraints,
                    solve_seconds=sol.solve_seconds, num_nodes=sol.num_nodes,
                    num_edges=sol.num_edges, mesh_candidates=candidates,
                    compile_seconds=compile_s)
