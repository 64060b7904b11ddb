"""Stage construction: which layers form each pipeline stage, on which
submesh, with which logical mesh.

``uniform_stages`` and ``manual_stages`` follow the user's option;
``auto_stages`` runs Alpa's stage DP with each layer's cost from the intra-op
ILP (``CostSource.MODEL``) or from compiling and timing it on a submesh
(``CostSource.PROFILE``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp

from alpa_py.compiler.auto_sharding import InfeasiblePlanError, run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, mesh_factorizations
from alpa_py.compiler.graph import OpGraph, subgraph
from alpa_py.compiler.lowering import io_shardings, make_step_fn
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.program import Task, make_mesh
from alpa_py.compiler.remat import plan_stage_remat, recompute_charges
from alpa_py.compiler.strategies.spec import replicated
from alpa_py.compiler.stages import (AutoStageOption, CostSource,
                                     ManualStageOption, StageSpec,
                                     UniformStageOption,
                                     stage_dp, submesh_choices)


@dataclasses.dataclass
class Pieces:
  """The step cut for a pipeline.

  Attributes:
    graph: the step's graph (one micro-batch).
    layers: the layer assignment.
    pipe_ops, post_ops: ops run per micro-batch / once (the update).
    marked: the accumulated (gradient) tensors.
    batch_dims: tensor id -> batch dim, where the options keep batch dims
      on the data axes (None: they do not).
    replicated_inputs: step inputs every stage keeps whole
      (``force_data_parallel``: the parameters).
  """

  graph: OpGraph
  layers: object
  pipe_ops: list
  post_ops: list
  marked: tuple
  batch_dims: dict | None = None
  replicated_inputs: frozenset = frozenset()


def _stage_ops(pieces: Pieces, start: int, end: int):
  la = pieces.layers
  fwd = [op for op in pieces.pipe_ops
         if op.index in la.forward and start <= la.layer_of[op.index] < end]
  bwd = [op for op in pieces.pipe_ops
         if op.index not in la.forward and start <= la.layer_of[op.index] < end]
  return fwd, bwd


def _needed_outside(graph: OpGraph, ops, keep: set) -> list[int]:
  inside = {op.index for op in ops}
  out = []
  for op in ops:
    for t in op.outputs:
      if t in keep or any(c not in inside for c in graph.consumers.get(t, ())):
        out.append(t)
  return out


def _stage_graphs(pieces: Pieces, start: int, end: int):
  """(joint graph, fwd graph, bwd graph) of the layers [start, end).

  With ``remat_layer`` the backward graph also holds the forward ops it
  recomputes (``compiler/remat.py``), and the forward returns, for its own
  backward, only its layers' inputs."""
  g = pieces.graph
  keep = set(pieces.marked) | g.outvar_set
  fwd, bwd = _stage_ops(pieces, start, end)
  out_b = _needed_outside(g, bwd, keep)
  out_joint = _needed_outside(g, fwd + bwd, keep)
  joint = subgraph(g, sorted(fwd + bwd, key=lambda o: o.index), out_joint)
  if not pieces.layers.remat:
    return joint, subgraph(g, fwd, _needed_outside(g, fwd, keep)), \
        subgraph(g, bwd, out_b)
  plan = plan_stage_remat(g, pieces.layers.layer_of, fwd, bwd)
  # what leaves the stage, plus the layer inputs its backward reads
  outside = set(out_joint) | set(plan.residuals)
  out_f = [t for op in fwd for t in op.outputs if t in outside]
  ops = {op.index: op for op in fwd + bwd}
  return joint, subgraph(g, fwd, out_f), subgraph(
      g, [ops[i] for i in plan.backward_order], out_b)


def recomputed_ops(pieces: Pieces, gb: OpGraph) -> list:
  """The forward ops a stage's backward graph runs again (none without
  ``remat_layer``)."""
  return [op for op in gb.ops if op.index in pieces.layers.forward]


def solve_stage(pieces: Pieces, start, end, logical,
                option: AutoShardingOption, profile):
  """The intra-op plan of layers [start, end) on a logical mesh:
  (solution, joint graph, forward graph, backward graph). With
  ``remat_layer`` the objective counts the recomputed forward ops twice."""
  joint, gf, gb = _stage_graphs(pieces, start, end)
  specs = {i: [replicated(len(joint.tensor(t).shape))]
           for i, t in enumerate(joint.invars)
           if t in pieces.replicated_inputs}
  mesh = LogicalMesh(tuple(logical), profile)
  charges = recompute_charges(joint, recomputed_ops(pieces, gb), mesh, option)
  sol = run_auto_sharding(joint, mesh, option, input_specs=specs,
                          batch_dims=pieces.batch_dims, surcharges=charges)
  return sol, joint, gf, gb


def compile_task(graph: OpGraph, sol, mesh, *, local_devices=True) -> Task:
  """One piece of a pipeline (a stage's forward or backward) compiled on
  its submesh."""
  fn = make_step_fn(graph, sol, mesh)
  ins, outs = io_shardings(graph, sol, mesh)
  sds = [jax.ShapeDtypeStruct(graph.tensor(t).shape, graph.tensor(t).dtype,
                              sharding=s) for t, s in zip(graph.invars, ins)]
  return Task.compile(fn, sds, graph.invars, graph.outvars, ins, outs,
                      local_devices=local_devices)


def _time_stage(f: Task, gf: OpGraph, b: Task, gb: OpGraph) -> float:
  """Median wall time of forward + backward on zeros (the profile cost)."""
  def zeros(ex, g):
    return [jax.device_put(jnp.zeros(g.tensor(t).shape, g.tensor(t).dtype), s)
            for t, s in zip(ex.in_ids, ex.in_shardings)]
  args_f, args_b = zeros(f, gf), zeros(b, gb)
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(f.compiled(*args_f))
    jax.block_until_ready(b.compiled(*args_b))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def uniform_stages(option: UniformStageOption, num_layers, num_devices):
  k = option.num_stages or num_layers
  if k > num_devices:
    raise ValueError(f"UniformStageOption(num_stages={k}) asks for more stages "
                     f"than there are devices (={num_devices})")
  if k > num_layers:
    raise ValueError(f"num_stages (={k}) exceeds the number of layers "
                     f"(={num_layers})")
  if num_devices % k:
    raise ValueError(f"num_stages (={k}) must divide the number of devices "
                     f"(={num_devices}) for UniformStageOption")
  per = num_devices // k
  shape = option.submesh_shape or (1, per)
  if math.prod(shape) != per:
    raise ValueError(f"submesh_shape (={shape}) must hold {per} devices "
                     f"({num_devices} devices / {k} stages)")
  bounds = [round(i * num_layers / k) for i in range(k + 1)]
  return [StageSpec((bounds[i], bounds[i + 1]), (1, per), tuple(shape),
                    (i * per, (i + 1) * per)) for i in range(k)]


def manual_stages(option: ManualStageOption, num_layers, num_devices):
  ids = option.forward_stage_layer_ids
  if len(ids) > num_devices:
    raise ValueError(f"ManualStageOption has {len(ids)} stages, more than the "
                     f"{num_devices} devices")
  covered = sum(len(s) for s in ids)
  if covered != num_layers:
    raise ValueError(f"forward_stage_layer_ids covers {covered} layers but the "
                     f"step has {num_layers}")
  sizes = [math.prod(s) for s in option.submesh_shapes]
  if sum(sizes) != num_devices:
    raise ValueError(f"submesh_shapes (={option.submesh_shapes}) hold "
                     f"{sum(sizes)} devices but {num_devices} are used")
  logical = option.submesh_logical_shapes or option.submesh_shapes
  out, d = [], 0
  for layer_ids, phys, log, size in zip(ids, option.submesh_shapes, logical,
                                        sizes):
    out.append(StageSpec((layer_ids[0], layer_ids[-1] + 1), tuple(phys),
                         tuple(log), (d, d + size)))
    d += size
  return out


# Profiled stage times, kept for the session: a layer that looks the same
# (same ops and shapes) on the same devices is not compiled and timed twice.
_PROFILE_CACHE: dict = {}


def _signature(graph: OpGraph) -> tuple:
  return tuple((op.name, tuple(graph.tensor(t).shape for t in op.inputs
                               if isinstance(t, int)),
                tuple(graph.tensor(t).shape for t in op.outputs))
               for op in graph.ops)


def _distinct_logical_shapes(size: int) -> list[tuple[int, int]]:
  """Logical meshes for a submesh of ``size`` devices, mirror images dropped
  ((d, 1) is (1, d); (4, 2) prices like (2, 4) on one node's links)."""
  return [(a, b) for a, b in mesh_factorizations(size) if a <= b]


def auto_stages(stage_option: AutoStageOption, pieces: Pieces, num_devices,
                devices, option: AutoShardingOption, profile, n_micro, report):
  """Stage DP with costs per layer, summed over a stage's layers.

  ``model``: each layer's intra-op ILP objective on each logical mesh.
  ``profile``: each layer compiled on a submesh and timed (forward +
  backward, median of 3), on the logical mesh the model prefers for the
  stage. Costing layers rather than every layer range keeps this to
  L x (logical meshes) ILPs and at most as many compiles.
  """
  L = pieces.layers.num_layers
  sizes = [math.prod(s) for s in submesh_choices(
      num_devices, stage_option.submesh_shape_space)]
  model: dict = {}
  measured: dict = {}
  t_model = t_prof = 0.0

  def layer_model(l, logical):
    nonlocal t_model
    if (l, logical) not in model:
      t0 = time.perf_counter()
      try:
        sol, _, _, _ = solve_stage(pieces, l, l + 1, logical, option, profile)
        model[(l, logical)] = (sol.objective, sol.estimated_peak_bytes)
      except InfeasiblePlanError:
        model[(l, logical)] = (math.inf, math.inf)
      t_model += time.perf_counter() - t0
    return model[(l, logical)]

  def layer_time(l, logical):
    nonlocal t_prof
    if (l, logical) not in measured:
      t0 = time.perf_counter()
      sol, joint, gf, gb = solve_stage(pieces, l, l + 1, logical, option,
                                       profile)
      sub = devices[:math.prod(logical)]
      key = (_signature(joint), logical, tuple(d.id for d in sub), option,
             pieces.layers.remat)
      if key not in _PROFILE_CACHE:
        mesh = make_mesh(sub, logical)
        f, b = compile_task(gf, sol, mesh), compile_task(gb, sol, mesh)
        _PROFILE_CACHE[key] = _time_stage(f, gf, b, gb)
      measured[(l, logical)] = _PROFILE_CACHE[key]
      t_prof += time.perf_counter() - t0
    return measured[(l, logical)]

  best_logical = {}
  budget = option.memory_budget_per_device

  def cost(i, j, size):
    best = (math.inf, None)
    for logical in _distinct_logical_shapes(size):
      parts = [layer_model(l, logical) for l in range(i, j)]
      total = sum(p[0] for p in parts)
      if budget is not None and sum(p[1] for p in parts) > budget:
        continue
      if total < best[0]:
        best = (total, logical)
    best_logical[(i, j, size)] = best[1]
    if best[1] is None or stage_option.cost_source == CostSource.MODEL:
      return best[0]
    return sum(layer_time(l, best[1]) for l in range(i, j))

  t0 = time.perf_counter()
  total, plan = stage_dp(L, num_devices, sizes, cost, n_micro)
  t_all = time.perf_counter() - t0
  if plan is None:
    raise InfeasiblePlanError(
        f"no stage of the {L} layers fits any submesh under "
        f"memory_budget_per_device={budget}; raise the budget or "
        "use more devices")
  report.update(stage_model_seconds=t_model, stage_profile_seconds=t_prof,
                stage_dp_seconds=t_all - t_model - t_prof,
                stage_candidates_modelled=len(model),
                stage_candidates_profiled=len(measured),
                predicted_latency=total)
  out, d = [], 0
  for i, j, size in plan:
    out.append(StageSpec((i, j), (1, size), tuple(best_logical[(i, j, size)]),
                         (d, d + size)))
    d += size
  return out
