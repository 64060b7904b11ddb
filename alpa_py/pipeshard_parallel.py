"""Compiling a step with PipeshardParallel.

trace (one micro-batch) -> OpGraph -> pre/body/update split -> layers ->
stages on submeshes -> per stage, one intra-op ILP over its forward and
backward ops and two compiled programs -> the update on the whole mesh ->
the schedule's instruction list.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import jax
import jax.numpy as jnp

from alpa_py import _progress
from alpa_py.compiler import accumulation
from alpa_py.compiler.auto_sharding import InfeasiblePlanError, run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.graph import OpGraph, evaluate, subgraph
from alpa_py.compiler.layers import assign_layers
from alpa_py.compiler.lowering import (constraint_hooks, io_shardings,
                                       make_mesh, make_step_fn, tensor_spec,
                                       to_partition_spec)
from alpa_py.compiler.schedules import clock_table
from alpa_py.compiler.stages import (AutoStageOption, ManualStageOption,
                                     StageSpec, UniformStageOption,
                                     logical_shapes, stage_dp, submesh_choices)
from alpa_py.executable import TensorPlan
from alpa_py.methods import PipeshardParallel
from alpa_py.pipeshard_plan import PipeshardPlan, StagePlan
from alpa_py.runtime.pipeshard import (PipeshardExecutable, TaskExec,
                                      build_instructions)
from alpa_py.shard_parallel import (make_plan, out_names_of, pass_config,
                                    trace_step)


@dataclasses.dataclass
class _Pieces:
  graph: OpGraph
  layers: object
  pipe_ops: list
  post_ops: list
  marked: tuple


def _stage_ops(pieces: _Pieces, start: int, end: int):
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


def _stage_graphs(pieces: _Pieces, start: int, end: int):
  """(joint graph, fwd graph, bwd graph) of the layers [start, end)."""
  g = pieces.graph
  keep = set(pieces.marked) | g.outvar_set
  fwd, bwd = _stage_ops(pieces, start, end)
  out_f = _needed_outside(g, fwd, keep)
  out_b = _needed_outside(g, bwd, keep)
  joint = subgraph(g, sorted(fwd + bwd, key=lambda o: o.index),
                   _needed_outside(g, fwd + bwd, keep))
  return joint, subgraph(g, fwd, out_f), subgraph(g, bwd, out_b)


def _solve_stage(pieces, start, end, logical, cfg, profile):
  joint, gf, gb = _stage_graphs(pieces, start, end)
  sol = run_auto_sharding(joint, LogicalMesh(tuple(logical), profile), cfg)
  return sol, joint, gf, gb


def _compile_task(graph: OpGraph, sol, mesh) -> TaskExec:
  fn = make_step_fn(graph, sol, mesh)
  ins, outs = io_shardings(graph, sol, mesh)
  sds = [jax.ShapeDtypeStruct(graph.tensor(t).shape, graph.tensor(t).dtype,
                              sharding=s) for t, s in zip(graph.invars, ins)]
  jitted = jax.jit(fn, in_shardings=tuple(ins), out_shardings=tuple(outs))
  compiled = jitted.lower(*sds).compile()
  return TaskExec(compiled, tuple(graph.invars), tuple(graph.outvars), tuple(ins),
                  jitted, sds, tuple(outs))


def _time_stage(f: TaskExec, gf: OpGraph, b: TaskExec, gb: OpGraph) -> float:
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


def _uniform_stages(option: UniformStageOption, num_layers, num_devices):
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


def _manual_stages(option: ManualStageOption, num_layers, num_devices):
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
  return [(a, b) for a, b in logical_shapes((1, size)) if a <= b]


def _auto_stages(option: AutoStageOption, pieces, num_devices, devices, cfg,
                 profile, n_micro, report):
  """Stage DP with costs per layer, summed over a stage's layers.

  ``model``: each layer's intra-op ILP objective on each logical mesh.
  ``profile``: each layer compiled on a submesh and timed (forward +
  backward, median of 3), on the logical mesh the model prefers for the
  stage. Costing layers rather than every layer range keeps this to
  L x (logical meshes) ILPs and at most as many compiles.
  """
  L = pieces.layers.num_layers
  sizes = [math.prod(s) for s in submesh_choices(num_devices,
                                                 option.submesh_shape_space)]
  model: dict = {}
  measured: dict = {}
  t_model = t_prof = 0.0

  def layer_model(l, logical):
    nonlocal t_model
    if (l, logical) not in model:
      t0 = time.perf_counter()
      try:
        sol, _, _, _ = _solve_stage(pieces, l, l + 1, logical, cfg, profile)
        model[(l, logical)] = (sol.objective, sol.estimated_peak_bytes)
      except InfeasiblePlanError:
        model[(l, logical)] = (math.inf, math.inf)
      t_model += time.perf_counter() - t0
    return model[(l, logical)]

  def layer_time(l, logical):
    nonlocal t_prof
    if (l, logical) not in measured:
      t0 = time.perf_counter()
      sol, joint, gf, gb = _solve_stage(pieces, l, l + 1, logical, cfg, profile)
      sub = devices[:math.prod(logical)]
      key = (_signature(joint), logical, tuple(d.id for d in sub), cfg)
      if key not in _PROFILE_CACHE:
        mesh = make_mesh(sub, logical)
        f, b = _compile_task(gf, sol, mesh), _compile_task(gb, sol, mesh)
        _PROFILE_CACHE[key] = _time_stage(f, gf, b, gb)
      measured[(l, logical)] = _PROFILE_CACHE[key]
      t_prof += time.perf_counter() - t0
    return measured[(l, logical)]

  best_logical = {}

  def cost(i, j, size):
    best = (math.inf, None)
    for logical in _distinct_logical_shapes(size):
      parts = [layer_model(l, logical) for l in range(i, j)]
      total = sum(p[0] for p in parts)
      if cfg.memory_budget is not None and sum(p[1] for p in parts) > cfg.memory_budget:
        continue
      if total < best[0]:
        best = (total, logical)
    best_logical[(i, j, size)] = best[1]
    if best[1] is None or option.cost_source == "model":
      return best[0]
    return sum(layer_time(l, best[1]) for l in range(i, j))

  t0 = time.perf_counter()
  total, plan = stage_dp(L, num_devices, sizes, cost, n_micro)
  t_all = time.perf_counter() - t0
  if plan is None:
    raise InfeasiblePlanError(
        f"no stage of the {L} layers fits any submesh under "
        f"memory_budget_per_device={cfg.memory_budget}; raise the budget or "
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


def _make_apply(graph: OpGraph, pieces: _Pieces, averaged: set, n: int,
                method, sig, alias_pairs, devices):
  post = pieces.post_ops
  needed: set = set()
  stack = [t for op in post for t in op.inputs if isinstance(t, int)]
  stack += [t for t in graph.outvars if isinstance(t, int)]
  pre_by_out = {t: op for op in pieces.pipe_ops for t in op.outputs}
  while stack:
    t = stack.pop()
    op = pre_by_out.get(t)
    if op is None or op.index in needed or t in averaged:
      continue
    needed.add(op.index)
    stack.extend(x for x in op.inputs if isinstance(x, int))
  ops = sorted([op for op in pieces.pipe_ops if op.index in needed] + post,
               key=lambda o: o.index)
  outs = [t for t in graph.outvars if isinstance(t, int)]
  g = subgraph(graph, ops, outs)
  aliases = [(graph.outvars[o], graph.invars[i]) for o, i in alias_pairs
             if isinstance(graph.outvars[o], int)]
  opt = method.default_auto_sharding_option
  profile = get_profile(opt.cost_profile)
  cfg = pass_config(opt)
  best = None
  for shape in [(a, len(devices) // a) for a in range(1, len(devices) + 1)
                if len(devices) % a == 0]:
    sol = run_auto_sharding(g, LogicalMesh(shape, profile), cfg,
                            aliases=[(o, i) for o, i in aliases
                                     if i in set(g.invars)])
    if best is None or sol.objective < best.objective:
      best = sol
  mesh = make_mesh(devices, best.mesh_shape)
  on_output, on_operand = constraint_hooks(g, best, mesh)
  div = [t in averaged for t in g.invars]

  def apply_fn(*args):
    args = [a / n if d and jnp.issubdtype(a.dtype, jnp.inexact) else a
            for a, d in zip(args, div)]
    env = dict(zip(g.invars, args))
    evaluate(g, None, on_output=on_output, on_operand=on_operand, env=env)
    return tuple(env[t] for t in g.outvars)

  ins, out_sh = io_shardings(g, best, mesh)
  sds = [jax.ShapeDtypeStruct(g.tensor(t).shape, g.tensor(t).dtype, sharding=s)
         for t, s in zip(g.invars, ins)]
  jitted = jax.jit(apply_fn, in_shardings=tuple(ins),
                   out_shardings=tuple(out_sh))
  compiled = jitted.lower(*sds).compile()
  return TaskExec(compiled, tuple(g.invars), tuple(g.outvars), tuple(ins),
                  jitted, sds, tuple(out_sh)), \
      best, g, mesh


def compile_pipeshard(fun, sig, method: PipeshardParallel) -> PipeshardExecutable:
  """Compiles ``fun`` for the call signature ``sig`` as a pipeline."""
  t_start = time.perf_counter()
  report: dict = {}
  n = method.num_micro_batches
  graph, out_tree, alias_pairs, _, _, batch_inputs = trace_step(fun, sig, n)
  part = accumulation.partition(graph, batch_inputs, n, out_names_of(out_tree))
  pipe_ops = sorted(part.pre + part.body, key=lambda o: o.index)
  t0 = time.perf_counter()
  layers = assign_layers(graph, pipe_ops, method.layer_option)
  report["layer_clustering_seconds"] = time.perf_counter() - t0
  _progress.log(f"{layers.num_layers} layers, GFLOP per layer: "
                + ", ".join(f"{f / 1e9:.3f}" for f in layers.layer_flops))
  pieces = _Pieces(graph, layers, pipe_ops, sorted(part.post, key=lambda o: o.index),
                   part.marked)
  devices = list(sig.devices)
  N = len(devices)
  opt = method.default_auto_sharding_option
  profile = get_profile(opt.cost_profile)
  cfg = pass_config(opt)
  so = method.stage_option
  t0 = time.perf_counter()
  if isinstance(so, UniformStageOption):
    specs = _uniform_stages(so, layers.num_layers, N)
  elif isinstance(so, ManualStageOption):
    specs = _manual_stages(so, layers.num_layers, N)
  else:
    specs = _auto_stages(so, pieces, N, devices, cfg, profile, n, report)
  report["stage_construction_seconds"] = time.perf_counter() - t0
  K = len(specs)
  _progress.log("stages: " + "; ".join(
      f"layers {s.layers[0]}-{s.layers[1] - 1} on {s.submesh_shape} as "
      f"{s.logical_shape}" for s in specs))

  stages, stage_plans = [], []
  producer_task: dict = {}
  t0 = time.perf_counter()
  for k, spec in enumerate(specs):
    try:
      sol, joint, gf, gb = _solve_stage(pieces, *spec.layers, spec.logical_shape,
                                        cfg, profile)
    except InfeasiblePlanError as e:
      raise InfeasiblePlanError(f"stage {k} (layers {spec.layers[0]}-"
                                f"{spec.layers[1] - 1}) fits no plan on its "
                                f"submesh {spec.submesh_shape}: {e}") from None
    mesh = make_mesh(devices[spec.device_range[0]:spec.device_range[1]],
                     spec.logical_shape)
    f, b = _compile_task(gf, sol, mesh), _compile_task(gb, sol, mesh)
    stages.append({"F": f, "B": b})
    for t in f.out_ids:
      producer_task[t] = ("F", k)
    for t in b.out_ids:
      producer_task[t] = ("B", k)
    stage_plans.append(StagePlan(
        index=k, layers=spec.layers, submesh_shape=spec.submesh_shape,
        logical_shape=spec.logical_shape,
        device_ids=tuple(d.id for d in devices[spec.device_range[0]:
                                               spec.device_range[1]]),
        num_forward_ops=len(gf.ops), num_backward_ops=len(gb.ops),
        predicted_seconds=sol.objective,
        inputs=tuple(_tensor_plan(graph, sig, sol, t, mesh) for t in joint.invars),
        strategies=tuple((op.name, sol.strategy_of.get(op.index, "follows"))
                         for op in joint.ops
                         if op.name in ("dot_general", "conv_general_dilated"))))
  report["stage_compile_seconds"] = time.perf_counter() - t0

  averaged = {t for t in part.marked if t in producer_task}
  apply, apply_sol, apply_graph, apply_mesh = _make_apply(
      graph, pieces, averaged, n, method, sig, alias_pairs, devices)

  # which task reads each tensor, for frees after last use
  readers: dict = {}
  for k, st in enumerate(stages):
    for kind in ("F", "B"):
      for t in st[kind].in_ids:
        readers.setdefault(t, set()).add((kind, k))
  clocks = clock_table(method.pipeline_schedule, K, n)
  tasks = [task for clock in clocks for task in clock]
  index_of = {task: i for i, task in enumerate(tasks)}
  batch_ids = [graph.invars[i] for i in sorted(batch_inputs)]
  per_step = set(graph.invars) - set(batch_ids)
  frees: dict = {}
  for t, rs in readers.items():
    if t in per_step:
      continue  # parameters stay for the whole step
    for m in range(n):
      last = max(index_of[(kind, k, m)] for kind, k in rs)
      frees.setdefault(last, []).append(t)
  for k, st in enumerate(stages):  # outputs nobody reads in the pipeline
    for kind in ("F", "B"):
      for t in st[kind].out_ids:
        if t not in readers:
          for m in range(n):
            frees.setdefault(index_of[(kind, k, m)], []).append(t)
  instructions = build_instructions(tasks, stages, per_step, averaged, frees)
  plan = PipeshardPlan(
      stages=tuple(stage_plans),
      schedule=tuple(" ".join(f"{kind}{s}.{m}" for kind, s, m in clock)
                     for clock in clocks),
      schedule_name=method.pipeline_schedule.value,
      num_micro_batches=n, num_layers=layers.num_layers,
      layer_flops=layers.layer_flops,
      update_plan=make_plan(apply_graph, apply_sol,
                            _input_names(graph, sig, apply_graph),
                            len(apply_graph.outvars), "update",
                            method.default_auto_sharding_option.cost_profile,
                            apply_mesh, out_names=out_names_of(out_tree)),
      compile_report=tuple(sorted(report.items())))
  ex = PipeshardExecutable(
      plan=plan, stages=stages, apply=apply, instructions=instructions,
      invar_ids=tuple(graph.invars), batch_ids=batch_ids, num_micro_batches=n,
      out_tree=out_tree, compile_seconds=time.perf_counter() - t_start,
      devices=devices)
  _progress.log(f"pipeline compiled in {ex.compile_seconds:.1f} s")
  return ex


def _tensor_plan(graph, sig, sol, t, mesh) -> TensorPlan:
  names = dict(zip(graph.invars, sig.paths))
  info = graph.tensor(t)
  return TensorPlan(names.get(t, f"%{t}"), info.shape, str(info.dtype),
                    to_partition_spec(tensor_spec(graph, sol, t),
                                      mesh.axis_names))


def _input_names(graph, sig, sub) -> tuple[str, ...]:
  names = dict(zip(graph.invars, sig.paths))
  return tuple(names.get(t, f"%{t} (accumulated)") for t in sub.invars)
