"""Compiling a step with PipeshardParallel.

trace (one micro-batch) -> OpGraph -> pre/body/update split -> layers ->
stages on submeshes -> per stage, one intra-op ILP over its forward and
backward ops and two compiled programs -> the update, on each stage's
submesh for its own parameters (``driver/stage_update.py``), or on the
whole mesh where it cannot be split ->
a ``PipelineProgram`` (the schedule's instruction list) that the backend
runs.
"""

from __future__ import annotations

import time
from typing import Callable

import jax

from alpa_py import _progress
from alpa_py.compiler import accumulation, control_flow, deferred_reduction
from alpa_py.compiler.auto_sharding import InfeasiblePlanError, run_auto_sharding
from alpa_py.compiler.cluster_env import (LogicalMesh, get_profile,
                                          mesh_factorizations)
from alpa_py.compiler.graph import OpGraph, subgraph
from alpa_py.compiler.graph_eval import evaluate
from alpa_py.compiler.layers import assign_layers
from alpa_py.compiler.lowering import (constraint_hooks, io_shardings,
                                       tensor_spec)
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.pipeline_program import StageProgram, emit_program
from alpa_py.compiler.program_check import check_program
from alpa_py.compiler.program import Task, make_mesh
from alpa_py.compiler.schedules import clock_table
from alpa_py.compiler.stages import ManualStageOption, UniformStageOption
from alpa_py.compiler.strategies.registry import is_heavy
from alpa_py.compiler.strategies.spec import to_partition_spec
from alpa_py.driver.executable import PipeshardExecutable
from alpa_py.driver.plans import PipeshardPlan, StagePlan, TensorPlan, make_plan
from alpa_py.driver.signature import Signature
from alpa_py.driver.stage_construction import (Pieces, auto_stages,
                                               compile_task, manual_stages,
                                               recomputed_ops, solve_stage,
                                               uniform_stages)
from alpa_py.driver.stage_update import LocalUpdate, stage_local_update
from alpa_py.driver.tracing import TracedStep, trace_step
from alpa_py.methods import PipeshardParallel
from alpa_py.runtime.backend import Backend

def _split_pre(graph: OpGraph, part) -> tuple[list, list]:
  """The batch-independent ops: (those that run in the stages, those that
  run only with the update).

  An op only the update needs that reads a step input no micro-batch op
  reads (``decay * momentum``, ``step + 1``) runs with the update, so that
  no stage receives optimizer state; the others stay with the stages, as
  the layer assignment placed them."""
  pre_by_out = {t: op for op in part.pre for t in op.outputs}
  needed: set = set()
  stack = [t for op in part.body for t in op.inputs if isinstance(t, int)]
  while stack:
    op = pre_by_out.get(stack.pop())
    if op is None or op.index in needed:
      continue
    needed.add(op.index)
    stack.extend(t for t in op.inputs if isinstance(t, int))
  read = {t for op in part.body for t in op.inputs if isinstance(t, int)}
  read |= {t for op in part.pre if op.index in needed
           for t in op.inputs if isinstance(t, int)}
  inputs = set(graph.invars)
  foreign: set = set()  # tensors that depend on a step input no stage reads
  for op in part.pre:
    if op.index not in needed and any(
        isinstance(t, int) and (t in foreign or (t in inputs and t not in read))
        for t in op.inputs):
      foreign.update(op.outputs)
  update_only = {op.index for op in part.pre if op.outputs
                 and set(op.outputs) <= foreign}
  return ([op for op in part.pre if op.index not in update_only],
          [op for op in part.pre if op.index in update_only])


def _update_ops(graph: OpGraph, pieces: Pieces, averaged: set):
  """The update's ops: the post part, and the pre ops it needs that do not
  run inside a stage (everything upstream of an accumulated value does)."""
  needed: set = set()
  stack = [t for op in pieces.post_ops for t in op.inputs if isinstance(t, int)]
  stack += [t for t in graph.outvars if isinstance(t, int)]
  pre_by_out = {t: op for op in pieces.pipe_ops for t in op.outputs}
  while stack:
    t = stack.pop()
    op = pre_by_out.get(t)
    if op is None or op.index in needed or t in averaged:
      continue
    needed.add(op.index)
    stack.extend(x for x in op.inputs if isinstance(x, int))
  return sorted([op for op in pieces.pipe_ops if op.index in needed]
                + pieces.post_ops, key=lambda o: o.index)


def _compile_update(traced: TracedStep, pieces: Pieces, averaged: set,
                    option: AutoShardingOption, devices):
  """The update on the whole mesh: (Task, solution, graph, mesh)."""
  graph = traced.graph
  g = subgraph(graph, _update_ops(graph, pieces, averaged),
               [t for t in graph.outvars if isinstance(t, int)])
  inputs = set(g.invars)
  aliases = [(o, i) for o, i in traced.graph_aliases if i in inputs]
  profile = get_profile(option.cost_profile)
  best = None
  for shape in mesh_factorizations(len(devices)):
    sol = run_auto_sharding(g, LogicalMesh(shape, profile), option,
                            aliases=aliases)
    if best is None or sol.objective < best.objective:
      best = sol
  mesh = make_mesh(devices, best.mesh_shape)
  on_output, on_operand = constraint_hooks(g, best, mesh)

  def apply_fn(*args):
    # accumulated values arrive as their mean (the program's AVG)
    env = dict(zip(g.invars, args))
    evaluate(g, None, on_output=on_output, on_operand=on_operand, env=env)
    return tuple(env[t] for t in g.outvars)

  ins, outs = io_shardings(g, best, mesh)
  sds = [jax.ShapeDtypeStruct(g.tensor(t).shape, g.tensor(t).dtype, sharding=s)
         for t, s in zip(g.invars, ins)]
  task = Task.compile(apply_fn, sds, g.invars, g.outvars, ins, outs)
  return task, best, g, mesh


def _stage_specs(method: PipeshardParallel, pieces: Pieces, devices,
                 option: AutoShardingOption, report: dict):
  so, L, N = method.stage_option, pieces.layers.num_layers, len(devices)
  if isinstance(so, UniformStageOption):
    return uniform_stages(so, L, N)
  if isinstance(so, ManualStageOption):
    return manual_stages(so, L, N)
  return auto_stages(so, pieces, N, devices, option,
                     get_profile(option.cost_profile),
                     method.num_micro_batches, report)


def _tensor_plan(names: dict, graph: OpGraph, sol, t, mesh) -> TensorPlan:
  info = graph.tensor(t)
  return TensorPlan(names.get(t, f"%{t}"), info.shape, str(info.dtype),
                    to_partition_spec(tensor_spec(graph, sol, t),
                                      mesh.axis_names))


class _PerDeviceTraces:
  """The step traced at the per-device batch of a data-parallel stage
  (``deferred_reduction``), once per stage size."""

  def __init__(self, fun: Callable, sig: Signature, traced: TracedStep):
    self._fun, self._sig, self._traced = fun, sig, traced
    self._graphs: dict = {}
    graph = traced.graph
    self.derived = deferred_reduction.batch_derived(
        graph, [graph.invars[i] for i in sorted(sig.batch_inputs)])

  def graph(self, d: int):
    """(per-device OpGraph, its ``SplitDims``), or (None, why not)."""
    if d not in self._graphs:
      n = self._traced.num_micro_batches
      try:
        local = trace_step(self._fun, self._sig, n * d,
                           unroll_layer_scans=True).graph
      except Exception as e:  # pylint: disable=broad-except
        self._graphs[d] = (None, f"the step does not trace at 1/{d} of the "
                           f"micro-batch ({type(e).__name__}: {e})")
      else:
        dims, why = deferred_reduction.split_dims(
            self._traced.graph, local, self._traced.batch_dims, self.derived,
            d)
        self._graphs[d] = (None, why) if why else (local, dims)
    return self._graphs[d]


def _deferrals(traces: _PerDeviceTraces | None, pieces: Pieces, solved):
  """Per stage, its ``Deferral`` and per-device trace (see
  ``deferred_reduction``), or None and a note on its gradient reduction."""
  if traces is None:
    return [(None, "")] * len(solved)
  splits, locals_ = [], []
  for *_, mesh in solved:
    d = mesh.devices.size
    local, split = traces.graph(d) if d > 1 else (None, "one device")
    locals_.append((local, split))
    splits.append((d, split) if local is not None else split)
  plans = deferred_reduction.plan_deferrals(
      [gb for _, _, _, gb, _ in solved], [gf for _, _, gf, _, _ in solved],
      splits, pieces.batch_dims, traces.derived, set(pieces.marked))
  out = []
  for p, (local, split) in zip(plans, locals_):
    if isinstance(p, str):
      out.append((None, f"per micro-batch ({p})"))
    else:
      out.append(((p, local, split), "once per step "
                  f"({len(p.accumulated)} accumulated partials)"))
  return out


def _num_residuals(gf: OpGraph, gb: OpGraph) -> int:
  """Values a stage's forward hands to its own backward."""
  return len(set(gf.outvars) & set(gb.invars))


def _compile_stages(pieces: Pieces, specs, devices, option: AutoShardingOption,
                    names: dict, traces: _PerDeviceTraces | None = None):
  """Per stage, its intra-op plan and compiled programs: (the
  ``StageProgram``s, their ``StagePlan``s, their (solution, joint graph,
  mesh))."""
  graph = pieces.graph
  profile = get_profile(option.cost_profile)
  solved = []
  for k, spec in enumerate(specs):
    try:
      sol, joint, gf, gb = solve_stage(pieces, *spec.layers, spec.logical_shape,
                                       option, profile)
    except InfeasiblePlanError as e:
      raise InfeasiblePlanError(f"stage {k} (layers {spec.layers[0]}-"
                                f"{spec.layers[1] - 1}) fits no plan on its "
                                f"submesh {spec.submesh_shape}: {e}") from None
    sub = devices[spec.device_range[0]:spec.device_range[1]]
    solved.append((sol, joint, gf, gb, make_mesh(sub, spec.logical_shape)))
  stages, stage_plans, solved_stages = [], [], []
  for k, (spec, (sol, joint, gf, gb, mesh), (deferral, note)) in enumerate(
      zip(specs, solved, _deferrals(traces, pieces, solved))):
    f, r = compile_task(gf, sol, mesh), None
    if deferral is None:
      b = compile_task(gb, sol, mesh)
    else:
      d, local, split = deferral
      b = deferred_reduction.compile_backward(gb, local, split, d, mesh)
      r = deferred_reduction.compile_reduce(gb, d.accumulated, mesh) \
          if d.accumulated else None
    device_ids = tuple(d.id for d in mesh.devices.flat)
    stages.append(StageProgram(k, f, b, device_ids, tuple(spec.logical_shape),
                               reduce=r))
    solved_stages.append((sol, joint, mesh))
    stage_plans.append(StagePlan(
        index=k, layers=spec.layers, submesh_shape=spec.submesh_shape,
        logical_shape=spec.logical_shape, device_ids=device_ids,
        num_forward_ops=len(gf.ops), num_backward_ops=len(gb.ops),
        predicted_seconds=sol.objective,
        inputs=tuple(_tensor_plan(names, graph, sol, t, mesh)
                     for t in joint.invars),
        strategies=tuple((op.name, sol.strategy_of.get(op.index, "follows"))
                         for op in joint.ops if is_heavy(op.name)),
        gradient_reduction=note,
        num_recomputed_ops=len(recomputed_ops(pieces, gb)),
        num_residuals=_num_residuals(gf, gb) if pieces.layers.remat else 0))
  return stages, stage_plans, solved_stages


def compile_pipeshard(fun: Callable, sig: Signature, method: PipeshardParallel,
                      backend: Backend) -> PipeshardExecutable:
  """Compiles ``fun`` for the call signature ``sig`` as a pipeline."""
  t_start = time.perf_counter()
  report: dict = {}
  n = method.num_micro_batches
  option = method.default_auto_sharding_option
  traced = trace_step(fun, sig, n, unroll_layer_scans=True)
  graph = traced.graph
  control_flow.warn_replicated(graph)
  part = accumulation.partition(graph, sig.batch_inputs, n, traced.out_names)
  stage_pre, update_pre = _split_pre(graph, part)
  t0 = time.perf_counter()
  # layers are assigned as if the stages ran every batch-independent op
  # (the placement rules see all readers); the stages then run only those
  # the micro-batches need
  layers = assign_layers(graph, sorted(part.pre + part.body,
                                       key=lambda o: o.index),
                         method.layer_option)
  pipe_ops = sorted(stage_pre + list(part.body), key=lambda o: o.index)
  report["layer_clustering_seconds"] = time.perf_counter() - t0
  _progress.log(f"{layers.num_layers} layers, GFLOP per layer: "
                + ", ".join(f"{f / 1e9:.3f}" for f in layers.layer_flops))
  forced = option.force_data_parallel or \
      option.force_batch_dim_to_mesh_dim is not None
  batch_ids = [graph.invars[i] for i in sorted(sig.batch_inputs)]
  pieces = Pieces(graph, layers, pipe_ops,
                  sorted(update_pre + list(part.post), key=lambda o: o.index),
                  part.marked,
                  batch_dims=traced.batch_dims if forced else None,
                  replicated_inputs=frozenset(
                      set(graph.invars) - set(batch_ids))
                  if option.force_data_parallel else frozenset())
  devices = list(sig.devices)
  t0 = time.perf_counter()
  specs = _stage_specs(method, pieces, devices, option, report)
  report["stage_construction_seconds"] = time.perf_counter() - t0
  backend.check_stage_placement([
      tuple(d.id for d in devices[s.device_range[0]:s.device_range[1]])
      for s in specs])
  _progress.log("stages: " + "; ".join(
      f"layers {s.layers[0]}-{s.layers[1] - 1} on {s.submesh_shape} as "
      f"{s.logical_shape}" for s in specs))

  names = dict(zip(graph.invars, sig.paths))
  t0 = time.perf_counter()
  traces = _PerDeviceTraces(fun, sig, traced) \
      if option.force_data_parallel and n > 1 else None
  stages, stage_plans, solved_stages = _compile_stages(
      pieces, specs, devices, option, names, traces)
  report["stage_compile_seconds"] = time.perf_counter() - t0

  produced = {t for st in stages for t in st.forward.out_ids + st.backward.out_ids}
  averaged = {t for t in part.marked if t in produced}
  t0 = time.perf_counter()
  out_ids = tuple(t for t in graph.outvars if isinstance(t, int))
  local = stage_local_update(traced, _update_ops(graph, pieces, averaged),
                             averaged, stages, solved_stages, option, names,
                             batch_ids)
  clocks = clock_table(method.pipeline_schedule, len(stages), n)
  if isinstance(local, LocalUpdate):
    update_plan = None
    program = emit_program(local.stages, None, clocks, graph.invars,
                           batch_ids, averaged, n, out_ids=out_ids,
                           combine=local.combine,
                           combine_stage=local.combine_stage)
    update_notes = local.notes
  else:
    update, update_sol, update_graph, update_mesh = _compile_update(
        traced, pieces, averaged, option, devices)
    update_plan = make_plan(
        update_graph, update_sol,
        tuple(names.get(t, f"%{t} (accumulated)")
              for t in update_graph.invars),
        len(update_graph.outvars), "update", option.cost_profile,
        update_mesh, out_names=traced.out_names)
    program = emit_program(stages, update, clocks, graph.invars, batch_ids,
                           averaged, n, out_ids=out_ids)
    update_notes = (f"whole-mesh update: {local}",)
  report["update_compile_seconds"] = time.perf_counter() - t0
  _progress.log(update_notes[0])
  check_program(program, graph)  # every read finds its value, or raise
  plan = PipeshardPlan(
      stages=tuple(stage_plans),
      schedule=tuple(" ".join(f"{kind}{s}.{m}" for kind, s, m in clock)
                     for clock in clocks),
      schedule_name=method.pipeline_schedule.value,
      num_micro_batches=n, num_layers=layers.num_layers,
      layer_flops=layers.layer_flops,
      update_plan=update_plan,
      update_notes=update_notes,
      compile_report=tuple(sorted(report.items())),
      remat_layer=layers.remat)
  ex = PipeshardExecutable(program, plan, traced.out_tree,
                           time.perf_counter() - t_start, backend, sig)
  _progress.log(f"pipeline compiled in {ex.compile_seconds:.1f} s")
  return ex
