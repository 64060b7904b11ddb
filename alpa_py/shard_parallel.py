"""Compiling one step with ShardParallel and its constrained variants.

trace -> OpGraph -> (per candidate mesh) ILP -> best plan -> lowering -> XLA.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax

from alpa_py import _progress
from alpa_py.compiler.auto_sharding import (InfeasiblePlanError, PassConfig,
                                            ShardingSolution, run_auto_sharding)
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.graph import OpGraph, build_graph
from alpa_py.compiler.lowering import (io_shardings, make_mesh, make_step_fn,
                                       tensor_spec, to_partition_spec)
from alpa_py.compiler.strategies.spec import FORBIDDEN_PENALTY, replicated
from alpa_py.executable import (Executable, OpPlan, ShardingPlan, SolveStats,
                                TensorPlan)
from alpa_py.methods import AutoShardingOption, InputLayout, ShardParallel

_BUDGET_ATTEMPTS = 4
_OPT_STATE_NAMES = {"opt_state", "mu", "nu", "momentum", "trace"}


def pass_config(opt: AutoShardingOption) -> PassConfig:
  return PassConfig(memory_budget=opt.memory_budget_per_device,
                    allow_all_gather=opt.allow_all_gather,
                    allow_all_to_all=opt.allow_all_to_all,
                    prefer_reduce_scatter=opt.prefer_reduce_scatter,
                    allow_mixed_mesh_shape=opt.allow_mixed_mesh_shape,
                    time_limit_s=float(opt.solver_time_limit_s))


def is_optimizer_state(path: str) -> bool:
  """Whether a flat input's path names optimizer state (``opt_state``, ...)."""
  return any(tok in _OPT_STATE_NAMES for tok in re.findall(r"[A-Za-z_]\w*", path))


def _largest_dim_spec(shape, axes, mesh_shape):
  n = math.prod(mesh_shape[a] for a in axes)
  for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[d] % n == 0 and n > 1:
      return tuple(axes if k == d else () for k in range(len(shape)))
  return replicated(len(shape))


def input_specs(layout: InputLayout, sig, mesh_shape, batch_shapes=None):
  """The specs each flat input may take under a method's layout policy."""
  if layout is InputLayout.AUTO:
    return {}
  axes = tuple(a for a, s in enumerate(mesh_shape) if s > 1)
  n = math.prod(mesh_shape)
  specs = {}
  for i, (leaf, owner, path) in enumerate(zip(sig.leaves, sig.owners, sig.paths)):
    shape = tuple(leaf.shape) if batch_shapes is None else batch_shapes[i]
    r = len(shape)
    if r == 0:
      continue
    if owner in sig.batch:
      if shape[0] % n:
        raise ValueError(f"{path}: batch dim 0 (={shape[0]}) must be divisible "
                         f"by the number of devices (={n}) for data-parallel "
                         "methods")
      specs[i] = [(axes,) + ((),) * (r - 1)]
    elif layout is InputLayout.DATA_PARALLEL:
      specs[i] = [replicated(r)]
    elif layout is InputLayout.ZERO3 or is_optimizer_state(path):
      specs[i] = [_largest_dim_spec(shape, axes, mesh_shape)]
    else:
      specs[i] = [replicated(r)]
  return specs


def find_aliases(out, sig, leaves):
  """(flat output, flat input) pairs: an output subtree that is an argument's
  next value (same tree structure, shapes and dtypes), e.g. the new state."""
  candidates = [(0, out)]
  if isinstance(out, (tuple, list)):
    offset = 0
    for item in out:
      candidates.append((offset, item))
      offset += len(jax.tree_util.tree_leaves(item))
  arg_offsets = {}
  offset = 0
  for n, treedef in zip(sig.dyn_argnums, sig.treedefs):
    arg_offsets[n] = (offset, treedef)
    offset += treedef.num_leaves
  pairs = []
  used = set()
  for out_off, sub in candidates:
    sub_leaves, sub_def = jax.tree_util.tree_flatten(sub)
    for n in sig.dyn_argnums:
      if n in sig.batch or n in used:
        continue
      in_off, treedef = arg_offsets[n]
      if treedef != sub_def:
        continue
      ok = all(getattr(a, "shape", None) == b.shape and
               getattr(a, "dtype", None) == b.dtype
               for a, b in zip(sub_leaves, leaves[in_off:in_off + len(sub_leaves)]))
      if ok:
        pairs.extend((out_off + k, in_off + k) for k in range(len(sub_leaves)))
        used.add(n)
        break
  return pairs


def trace(fun, sig, leaves_sds):
  """Traces ``fun`` on abstract flat inputs: (ClosedJaxpr, out tree, aliases)."""
  info = {}

  def flat_fun(*leaves):
    out = fun(*sig.rebuild_args(leaves))
    out_leaves, out_tree = jax.tree_util.tree_flatten(out)
    info["tree"] = out_tree
    info["aliases"] = find_aliases(out, sig, leaves)
    return out_leaves

  closed = jax.make_jaxpr(flat_fun)(*leaves_sds)
  return closed, info["tree"], info["aliases"]


def solve_meshes(graph: OpGraph, method: ShardParallel, num_devices: int,
                 specs_for_mesh, alias_pairs, layout: InputLayout,
                 memory_budget=None):
  """Runs the pass on each candidate mesh; returns (best, candidates)."""
  opt = method.auto_sharding_option
  profile = get_profile(opt.cost_profile)
  cfg = dataclasses.replace(pass_config(opt), memory_budget=memory_budget)
  aliases = [(graph.outvars[o], graph.invars[i]) for o, i in alias_pairs
             if isinstance(graph.outvars[o], int)]
  penalty = 0.0 if layout is InputLayout.AUTO else FORBIDDEN_PENALTY
  best, candidates, failures = None, [], []
  for shape in method.mesh_shapes(num_devices):
    try:
      sol = run_auto_sharding(graph, LogicalMesh(shape, profile), cfg,
                              input_specs=specs_for_mesh(shape),
                              aliases=aliases, alias_penalty=penalty)
    except InfeasiblePlanError as e:
      failures.append(e)
      continue
    candidates.append((shape, sol.objective))
    if best is None or sol.objective < best.objective - 1e-15:
      best = sol
  if best is None:
    raise failures[0]
  return best, tuple(candidates)


def _shapes_str(graph: OpGraph, op) -> str:
  parts = []
  for t in op.inputs:
    if isinstance(t, int):
      info = graph.tensor(t)
      parts.append(f"{info.dtype}{list(info.shape)}")
  return " x ".join(parts)


def make_plan(graph: OpGraph, sol: ShardingSolution, paths, out_count,
              method_name: str, cost_profile: str, mesh, num_micro_batches=1,
              out_names=None, input_shapes=None) -> ShardingPlan:
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
  for op in graph.ops:
    if op.name in ("dot_general", "conv_general_dilated"):
      out_t = op.outputs[0]
      ops.append(OpPlan(op.index, op.name, _shapes_str(graph, op),
                        sol.strategy_of.get(op.index, "follows operand"),
                        to_partition_spec(tensor_spec(graph, sol, out_t), names)))
  return ShardingPlan(
      method=method_name, mesh_shape=sol.mesh_shape,
      axis_names=tuple(names), inputs=inputs, outputs=tuple(outputs),
      ops=tuple(ops), num_micro_batches=num_micro_batches,
      cost_profile=cost_profile,
      predicted_step_seconds=sol.objective,
      estimated_peak_bytes=sol.estimated_peak_bytes)


def out_names_of(out_tree) -> list[str]:
  dummy = jax.tree_util.tree_unflatten(out_tree, list(range(out_tree.num_leaves)))
  flat, _ = jax.tree_util.tree_flatten_with_path(dummy)
  return [f"out{jax.tree_util.keystr(p)}" for p, _ in flat]


def solve_stats(sol: ShardingSolution, candidates, compile_s=0.0) -> SolveStats:
  return SolveStats(status=sol.status, objective=sol.objective,
                    num_variables=sol.num_variables,
                    num_constraints=sol.num_constraints,
                    solve_seconds=sol.solve_seconds, num_nodes=sol.num_nodes,
                    num_edges=sol.num_edges, mesh_candidates=candidates,
                    compile_seconds=compile_s)


def trace_step(fun, sig, n: int):
  """Traces the step on one micro-batch (the whole batch when ``n == 1``).

  Returns:
    (graph, out tree, alias pairs, traced input shapes, weak types, flat
    positions of the batch inputs).
  """
  from alpa_py.api import weak_type
  from alpa_py.compiler import accumulation
  shapes = accumulation.micro_batch_shapes(sig.leaves, sig.owners, sig.batch,
                                           sig.paths, n)
  weak = [weak_type(x) for x in sig.leaves]
  sds = [jax.ShapeDtypeStruct(shape, x.dtype, weak_type=w)
         for shape, x, w in zip(shapes, sig.leaves, weak)]
  with _progress.step("tracing"):
    closed, out_tree, alias_pairs = trace(fun, sig, sds)
  graph = build_graph(closed)
  _progress.log(f"graph: {graph.summary()}")
  batch_inputs = {i for i, o in enumerate(sig.owners) if o in sig.batch}
  return graph, out_tree, alias_pairs, shapes, weak, batch_inputs


def compile_step(fun, args, sig, method: ShardParallel) -> Executable:
  """Compiles ``fun`` for the call signature ``sig`` under ``method``."""
  from alpa_py.compiler import accumulation

  t_start = time.perf_counter()
  n = method.num_micro_batches or 1
  graph, out_tree, alias_pairs, shapes, weak, batch_inputs = trace_step(
      fun, sig, n)
  part = None
  if n > 1:
    part = accumulation.partition(graph, batch_inputs, n,
                                  out_names_of(out_tree))
  devices = sig.devices
  layout = method.layout
  budget = method.auto_sharding_option.memory_budget_per_device
  ilp_budget = budget
  best_bytes = None  # smallest XLA memory seen over the re-plans
  for attempt in range(_BUDGET_ATTEMPTS):
    try:
      best, candidates = solve_meshes(
          graph, method, len(devices),
          lambda shape: input_specs(layout, sig, shape, shapes), alias_pairs,
          layout, ilp_budget)
    except InfeasiblePlanError as e:
      if attempt == 0:
        raise
      raise InfeasiblePlanError(
          f"no plan fits memory_budget_per_device={budget:.0f} bytes: the "
          f"smallest plan XLA compiled needs {best_bytes} bytes per device, and "
          f"tighter plans are infeasible ({e}). Raise the budget or use more "
          "devices.") from None
    mesh = make_mesh(devices, best.mesh_shape)
    if part is None:
      fn = make_step_fn(graph, best, mesh)
    else:
      fn = accumulation.make_accumulating_fn(graph, best, mesh, part,
                                             batch_inputs, n)
    ins, outs = io_shardings(graph, best, mesh)
    donate = tuple(i for i, o in enumerate(sig.owners) if o in sig.donate)
    lowered_args = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=w,
                                         sharding=sh)
                    for x, w, sh in zip(sig.leaves, weak, ins)]
    jitted = jax.jit(fn, in_shardings=tuple(ins), out_shardings=tuple(outs),
                     donate_argnums=donate)
    with _progress.step("XLA lowering + compile"):
      compiled = jitted.lower(*lowered_args).compile()
    plan = make_plan(graph, best, sig.paths, len(graph.outvars),
                     type(method).__name__,
                     method.auto_sharding_option.cost_profile, mesh,
                     num_micro_batches=n, out_names=out_names_of(out_tree),
                     input_shapes=[tuple(x.shape) for x in sig.leaves])
    ex = Executable(compiled, plan, mesh,
                    solve_stats(best, candidates, time.perf_counter() - t_start),
                    ins, out_tree)
    ex.jitted, ex.lowered_args, ex.out_specs = jitted, lowered_args, [
        o.spec for o in outs]
    used = ex.memory_per_device()
    if budget is None or used <= budget:
      break
    # XLA's buffer assignment (resharding temporaries, fusion buffers) needs
    # more than the ILP's liveness model counted: re-plan with the ILP's
    # budget scaled by what was missed.
    best_bytes = used if attempt == 0 else min(best_bytes, used)
    ilp_budget = ilp_budget * budget / used * 0.95
    _progress.log(f"XLA's step needs {used} bytes per device, above the budget "
                  f"{budget:.0f}; re-planning with an ILP budget of "
                  f"{ilp_budget:.0f}")
  else:
    raise InfeasiblePlanError(
        f"no plan fits memory_budget_per_device={budget:.0f} bytes: after "
        f"{_BUDGET_ATTEMPTS} plans the smallest XLA compiled needs "
        f"{best_bytes} bytes per device. Raise the budget or use more devices.")
  return ex
