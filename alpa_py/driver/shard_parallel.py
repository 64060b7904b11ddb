"""Compiling one step with ShardParallel and its constrained variants.

A compile is a chain of passes over frozen values::

  Signature --trace_step--> TracedStep --plan_step--> PlannedStep
            --lower_and_compile--> CompiledStep --> Executable

``compile_shard_parallel`` runs the chain with two feedback loops around the
last two passes, each a wrapper:

* ``with_collective_replans``: a collective XLA inserted that the plan did
  not price is charged to the op it was inserted for, and the step
  re-planned (a few times at most); what remains different is a
  ``PlanMismatchWarning`` and is shown in ``ex.plan``.
* ``with_budget_retry``: when XLA's compiled step needs more memory than the
  budget, the ILP's budget is tightened and the step re-planned.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Callable

from jax.sharding import Mesh

from alpa_py import _progress
from alpa_py.compiler import accumulation, control_flow
from alpa_py.compiler.auto_sharding import (InfeasiblePlanError,
                                            ShardingSolution, run_auto_sharding)
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.collectives import (PlanMismatchWarning,
                                          count_collectives, plan_events)
from alpa_py.compiler.hlo_stats import collective_counts, collectives
from alpa_py.compiler.lowering import io_shardings, make_step_fn
from alpa_py.compiler.program import Task, make_mesh
from alpa_py.compiler.strategies.spec import FORBIDDEN_PENALTY
from alpa_py.compiler.surcharge import new_surcharges
from alpa_py.driver import compiled_selection
from alpa_py.driver.config import ShardConfig
from alpa_py.driver.executable import Executable
from alpa_py.driver.layout import (check_batch_divisible, input_specs,
                                   light_replicated, runner_up_exclusions)
from alpa_py.driver.plans import (ShardingPlan, SolveStats, make_plan,
                                  solve_stats)
from alpa_py.driver.signature import Signature
from alpa_py.driver.tracing import TracedStep, trace_step
from alpa_py.methods import InputLayout
from alpa_py.runtime.backend import Backend

_BUDGET_ATTEMPTS = 4
_COLLECTIVE_REPLANS = 3


@dataclasses.dataclass(frozen=True)
class PlannedStep:
  """The best solution over the candidate meshes.

  Attributes:
    solution: the chosen mesh's solution.
    candidates: (mesh shape, objective) of every mesh that had a plan.
    surcharges: the (op, strategy) surcharges the solve was charged with,
      for the chosen mesh.
  """

  solution: ShardingSolution
  candidates: tuple[tuple[tuple[int, ...], float], ...]
  surcharges: tuple = ()

  @property
  def surcharge_map(self) -> dict:
    return dict(self.surcharges)


def _logical_mesh(config: ShardConfig, shape) -> LogicalMesh:
  return LogicalMesh(tuple(shape), get_profile(config.option.cost_profile),
                     config.link_costs)


def plan_step(traced: TracedStep, sig: Signature, config: ShardConfig,
              memory_budget: float | None,
              surcharges: dict | None = None,
              solved: dict | None = None) -> PlannedStep:
  """Runs the intra-op pass on each candidate mesh; keeps the cheapest.

  Args:
    surcharges: mesh shape -> {(op index, strategy name): Surcharge}.
    solved: a memo of earlier solves of this step (a re-plan re-solves only
      the meshes whose surcharges changed).

  Raises:
    InfeasiblePlanError: no candidate mesh has a plan under the budget.
  """
  option = dataclasses.replace(config.option,
                               memory_budget_per_device=memory_budget)
  penalty = 0.0 if config.layout is InputLayout.AUTO else FORBIDDEN_PENALTY
  batch_dims = traced.batch_dims if config.forces_batch_dim else None
  surcharges = surcharges or {}
  excluded, whole = {}, {}
  if config.runner_up_of is not None:
    excluded = runner_up_exclusions(traced.graph, sig, config.runner_up_of)
    if config.replicate_light:
      whole = light_replicated(traced.graph, sig)
  best, best_charges, candidates, failures = None, {}, [], []
  for shape in config.mesh_shapes:
    specs = input_specs(config.layout, sig, shape, traced.input_shapes, option)
    specs = {**specs, **whole}
    if batch_dims is not None:
      check_batch_divisible(sig, traced.input_shapes, shape, option)
    charges = surcharges.get(tuple(shape), {})
    key = (tuple(shape), memory_budget, tuple(sorted(charges.items())))
    if solved is None or key not in solved:
      try:
        result = run_auto_sharding(
            traced.graph, _logical_mesh(config, shape), option,
            input_specs=specs, aliases=traced.graph_aliases,
            alias_penalty=penalty, batch_dims=batch_dims, surcharges=charges,
            excluded_specs=excluded)
      except InfeasiblePlanError as e:
        result = e
      if solved is not None:
        solved[key] = result
    else:
      result = solved[key]
    if isinstance(result, InfeasiblePlanError):
      failures.append(result)
      continue
    sol = result
    candidates.append((shape, sol.objective))
    if best is None or sol.objective < best.objective - 1e-15:
      best, best_charges = sol, charges
  if best is None:
    raise failures[0]
  return PlannedStep(best, tuple(candidates),
                     tuple(sorted(best_charges.items())))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The compiled program and its plan, not yet loaded on a backend."""

  task: Task
  plan: ShardingPlan
  mesh: Mesh
  stats: SolveStats
  planned: PlannedStep


def lower_and_compile(traced: TracedStep, planned: PlannedStep, sig: Signature,
                      config: ShardConfig, t_start: float) -> CompiledStep:
  """Constrains the step to the plan and compiles it with XLA."""
  graph, best = traced.graph, planned.solution
  if config.propagate:
    best = dataclasses.replace(best, constrained=(), operand_specs=())
  n = traced.num_micro_batches
  mesh = make_mesh(sig.devices, best.mesh_shape)
  if n == 1:
    fn = make_step_fn(graph, best, mesh)
  else:
    part = accumulation.partition(graph, sig.batch_inputs, n, traced.out_names)
    fn = accumulation.make_accumulating_fn(graph, best, mesh, part,
                                           sig.batch_inputs, n)
  ins, outs = io_shardings(graph, best, mesh)
  # the state fed back leaves the step in the layout the next step reads:
  # XLA converts it inside the program (the ILP priced that conversion on
  # its alias edges, ``plan_events`` counts it) rather than the caller
  # resharding it between steps
  for o, i in traced.alias_pairs:
    outs[o] = ins[i]
  arg_specs = [aval.sds(sharding=sh) for aval, sh in zip(sig.avals, ins)]
  with _progress.step("XLA lowering + compile"):
    task = Task.compile(fn, arg_specs, range(len(ins)), range(len(outs)), ins,
                        outs, donate_argnums=sig.donated_inputs)
  return describe(traced, planned, sig, config, task, mesh, t_start)


def describe(traced: TracedStep, planned: PlannedStep, sig: Signature,
             config: ShardConfig, task: Task, mesh: Mesh,
             t_start: float) -> CompiledStep:
  """The ``CompiledStep`` of a compiled ``task``: its plan, with the
  collectives the plan predicts beside those XLA compiled."""
  graph, best = traced.graph, planned.solution
  n = traced.num_micro_batches
  counts = None
  if n == 1 and not config.propagate:
    # an accumulating step runs its body in a loop: the static count of its
    # HLO is not the plan's, so it is not compared
    platform = mesh.devices.flat[0].platform
    events = plan_events(graph, best, planned.surcharge_map,
                         traced.graph_aliases)
    counts = (count_collectives(graph, events, platform),
              collective_counts(task.hlo_text()))
  plan = make_plan(graph, best, sig.paths, len(graph.outvars),
                   config.method_name, config.option.cost_profile, mesh,
                   num_micro_batches=n, out_names=traced.out_names,
                   input_shapes=[a.shape for a in sig.avals],
                   collectives=counts, propagated=config.propagate)
  stats = solve_stats(best, planned.candidates, time.perf_counter() - t_start)
  return CompiledStep(task, plan, mesh, stats, planned)


def _gap(step: CompiledStep) -> int:
  """How many collectives the compiled step and its plan disagree on."""
  return sum(abs(p - c) for p, c in step.plan.collective_mismatch.values())


def _same_layouts(a: ShardingSolution, b: ShardingSolution) -> bool:
  """Whether two solutions lower to the same program."""
  return (a.mesh_shape, a.tensor_specs, a.operand_specs, a.constrained) == \
      (b.mesh_shape, b.tensor_specs, b.operand_specs, b.constrained)


def with_collective_replans(plan_with: Callable[[dict], PlannedStep],
                            compile_planned: Callable[[PlannedStep],
                                                      CompiledStep],
                            recount: Callable[[PlannedStep, CompiledStep],
                                              CompiledStep],
                            traced: TracedStep,
                            config: ShardConfig) -> CompiledStep:
  """Compiles, charges ops for collectives XLA added that the plan did not
  predict, and re-plans while that finds new ones (a few times at most). A
  re-plan that lowers to the same program is not compiled again: only its
  prediction changes (the charged collectives are now part of it)."""
  surcharges: dict = {}
  step = compile_planned(plan_with(surcharges))
  for _ in range(_COLLECTIVE_REPLANS):
    if not step.plan.collective_mismatch:
      break
    sol = step.planned.solution
    known = step.planned.surcharge_map
    charged = new_surcharges(
        traced.graph, sol,
        plan_events(traced.graph, sol, known, traced.graph_aliases),
        collectives(step.task.hlo_text()),
        _logical_mesh(config, sol.mesh_shape), known,
        forbidden=config.forbidden_collectives)
    if charged == known:
      break
    _progress.log(f"XLA added {len(charged) - len(known)} resharding(s) the "
                  "plan did not price; charging their ops and re-planning")
    surcharges = {**surcharges, tuple(sol.mesh_shape): charged}
    planned = plan_with(surcharges)
    if _same_layouts(planned.solution, sol):
      step = recount(planned, step)
      continue
    replanned = compile_planned(planned)
    if _gap(replanned) >= _gap(step):
      break  # the new layout did not bring XLA closer to its plan: keep it
    step = replanned
  mismatch = step.plan.collective_mismatch
  if mismatch:
    warnings.warn(PlanMismatchWarning(
        "the compiled step's collectives differ from its plan's: " +
        ", ".join(f"{k} predicted {p}, compiled {c}"
                  for k, (p, c) in mismatch.items()) +
        " (ex.plan shows both)"), stacklevel=2)
  return step


def with_budget_retry(compile_once: Callable[[float | None], CompiledStep],
                      budget: float | None) -> CompiledStep:
  """Runs ``compile_once(ilp_budget)`` until XLA's step fits ``budget``.

  XLA's buffer assignment (resharding temporaries, fusion buffers) may need
  more than the ILP's liveness model counted: each retry scales the ILP's
  budget by what was missed.

  Raises:
    InfeasiblePlanError: no plan fits after a few attempts.
  """
  ilp_budget = budget
  best_bytes = None  # smallest XLA memory seen over the re-plans
  for attempt in range(_BUDGET_ATTEMPTS):
    try:
      step = compile_once(ilp_budget)
    except InfeasiblePlanError as e:
      if attempt == 0:
        raise
      raise InfeasiblePlanError(
          f"no plan fits memory_budget_per_device={budget:.0f} bytes: the "
          f"smallest plan XLA compiled needs {best_bytes} bytes per device, and "
          f"tighter plans are infeasible ({e}). Raise the budget or use more "
          "devices.") from None
    used = step.task.memory()
    if budget is None or used <= budget:
      return step
    best_bytes = used if attempt == 0 else min(best_bytes, used)
    ilp_budget = ilp_budget * budget / used * 0.95
    _progress.log(f"XLA's step needs {used} bytes per device, above the budget "
                  f"{budget:.0f}; re-planning with an ILP budget of "
                  f"{ilp_budget:.0f}")
  raise InfeasiblePlanError(
      f"no plan fits memory_budget_per_device={budget:.0f} bytes: after "
      f"{_BUDGET_ATTEMPTS} plans the smallest XLA compiled needs "
      f"{best_bytes} bytes per device. Raise the budget or use more devices.")


def compile_shard_parallel(fun: Callable, sig: Signature, config: ShardConfig,
                           backend: Backend, leaves=None) -> Executable:
  """Compiles ``fun`` for the call signature ``sig``: trace, then plan and
  compile under the memory budget, checking the collectives. ``leaves``:
  the call's flat arguments, where a compiled-cost selection may time its
  candidates on them (a local backend only)."""
  t_start = time.perf_counter()
  traced = trace_step(fun, sig, config.num_micro_batches)
  control_flow.warn_replicated(traced.graph)
  solves: dict = {}  # option -> the ILP solves made under it

  def compile_config(cfg: ShardConfig) -> CompiledStep:
    # one memo per distinct problem: the same options under another input
    # layout (ZeRO-2 / ZeRO-3) or exclusion are another ILP
    runner_up = None if cfg.runner_up_of is None else \
        cfg.runner_up_of.tensor_specs
    solved = solves.setdefault(
        (cfg.option, cfg.layout, runner_up, cfg.replicate_light), {})

    def compile_once(ilp_budget):
      return with_collective_replans(
          lambda charges: plan_step(traced, sig, cfg, ilp_budget, charges,
                                    solved),
          lambda planned: lower_and_compile(traced, planned, sig, cfg,
                                            t_start),
          lambda planned, step: describe(traced, planned, sig, cfg,
                                         step.task, step.mesh, t_start),
          traced, cfg)

    return with_budget_retry(compile_once, cfg.memory_budget)

  if compiled_selection.selects(config):
    step = compiled_selection.select(
        compile_config, config, len(sig.devices),
        leaves if getattr(backend, "kind", None) == "local" else None,
        sig.donated_inputs)
  else:
    step = compile_config(config)
  return Executable(step.task, step.plan, step.mesh, step.stats,
                    traced.out_tree, backend, sig)
