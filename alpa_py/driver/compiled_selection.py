"""Choosing among compiled programs by the cost profile's price of each
(``AutoShardingOption.select_by_compiled_cost``), and by timing the cheapest
of them (``measure_candidates``).

The ILP prices a traced graph op by op; XLA then fuses elementwise chains,
merges collectives and adds copies around reshardings. Where the profile is
a calibrated model, its price of a compiled program is what was fitted to
measured programs, so it is the better judge of two plans. The candidates
are the ILP's plan (on the logical mesh its objective chose); on each of the
ILP's three cheapest meshes, the ILP with every batch dim kept on the first
mesh axis (Alpa's ``force_batch_dim_to_mesh_dim=0``: data parallel, with the
ILP free on the ops that have no batch dim, such as experts), pinned op by
op and with only the step's inputs and outputs pinned to its layouts (XLA's
sharding propagation lays out the rest: it may shard a dispatch or a
gradient more cheaply than the plan's op-by-op layouts); the runner-up of
the pinned one priced cheapest (the same ILP with the layouts it gave the
heaviest inputs ruled out), pinned, propagated, and propagated with the
lighter parameters replicated (on the suite's MoE: expert parallelism with
the dense weights whole, DeepSpeed-MoE's layout); the ILP with the batch on
axis 0 and every parameter split on the other axis of its two cheapest 2-D
meshes (tensor parallelism, the ILP choosing the split dims); and the same
pass with fewer choices (the inputs in the data-parallel, ZeRO-2 and ZeRO-3
layouts). Each is compiled as it would be on its own (candidates that
compile to one program are timed once), and the fastest measured is kept
(or, for abstract arguments or with ``measure_candidates=0``, the cheapest
priced).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from alpa_py import _progress
from alpa_py.compiler.auto_sharding import InfeasiblePlanError
from alpa_py.compiler.cluster_env import get_profile
from alpa_py.compiler.program_cost import price_program
from alpa_py.driver import candidate_timing
from alpa_py.driver.config import ShardConfig
from alpa_py.methods import InputLayout

# the constrained layouts compared, with the options their methods set
_LAYOUTS = (("data-parallel", InputLayout.DATA_PARALLEL, False),
            ("zero2", InputLayout.ZERO2, True),
            ("zero3", InputLayout.ZERO3, True))


def selects(config: ShardConfig) -> bool:
  """Whether ``config`` compares compiled programs."""
  on = config.option.select_by_compiled_cost
  if on is None:
    on = get_profile(config.option.cost_profile).model is not None
  return bool(on) and config.layout is InputLayout.AUTO and \
      not config.mesh_fixed and config.link_costs is None


def _distinct_meshes(candidates) -> list[tuple[int, ...]]:
  """The ILP's meshes, cheapest objective first, one per shape of its
  non-trivial axes ((8, 1) and (1, 8) are one)."""
  out, seen = [], set()
  for shape, _ in sorted(candidates, key=lambda c: c[1]):
    key = tuple(d for d in shape if d > 1)
    if key not in seen:
      seen.add(key)
      out.append(tuple(shape))
  return out


def _on_mesh(config: ShardConfig, shape) -> ShardConfig:
  return dataclasses.replace(config, mesh_shapes=(tuple(shape),),
                             mesh_fixed=True)


def _batch_split(config: ShardConfig) -> ShardConfig:
  return dataclasses.replace(config, option=dataclasses.replace(
      config.option, force_batch_dim_to_mesh_dim=0))


# meshes (cheapest ILP objective first) whose batch-split propagated
# candidate is compiled
PROPAGATED_MESHES = 3


def ilp_variants(config: ShardConfig, meshes) -> list[tuple[str, ShardConfig]]:
  """(name, config) of the ILP's other candidates, given its meshes
  cheapest first: on each of the ``PROPAGATED_MESHES`` cheapest, the ILP
  with the batch on mesh axis 0, pinned op by op and with only the inputs
  and outputs pinned (XLA's propagation lays out the rest). Without the
  batch split, propagation from the ILP's inputs alone loses the batch
  layout of the activations (priced 1.6-2x the constrained plan on the
  suite's GPT and MoE), so that form is not compiled."""
  if config.option.force_batch_dim_to_mesh_dim is not None:
    return []
  out = []
  for shape in meshes[:PROPAGATED_MESHES]:
    # the batch goes on axis 0: of (1, n) that is (n, 1)
    wide = shape if shape[0] > 1 else tuple(reversed(shape))
    if wide[0] == 1:
      continue
    cfg = _batch_split(_on_mesh(config, wide))
    out.append(("ilp batch-split", cfg))
    out.append(("ilp batch-split propagated",
                dataclasses.replace(cfg, propagate=True)))
  return out


def runner_up_variants(cfg: ShardConfig,
                       step) -> list[tuple[str, ShardConfig]]:
  """(name, config) of the runner-up candidates of the batch-split ILP
  candidate (pinned) priced cheapest as compiled (``step``, compiled from
  ``cfg``; the free ILP's cheapest mesh need not be its): the same ILP
  with the layouts it gave the heaviest inputs ruled out
  (``layout.runner_up_exclusions``), pinned and propagated, and propagated
  with every lighter parameter and state array replicated
  (``layout.light_replicated``: gathering each small weight every step
  costs more on the devices than its prices say). Its op-by-op prices may
  rank two layouts of the dominant arrays within a few percent where the
  compiled programs differ by far more: on the suite's MoE the runner-up
  splits the experts by expert (expert parallelism), the first choice by
  their FFN width."""
  ru = dataclasses.replace(cfg, runner_up_of=step.planned.solution)
  return [("ilp runner-up", ru),
          ("ilp runner-up propagated", dataclasses.replace(ru, propagate=True)),
          ("ilp heavy-split propagated", dataclasses.replace(
              ru, propagate=True, replicate_light=True))]


# 2-D meshes (cheapest ILP objective first) whose tensor-parallel candidate
# is compiled
TENSOR_PARALLEL_MESHES = 2


def tensor_parallel_variants(config: ShardConfig,
                             meshes) -> list[tuple[str, ShardConfig]]:
  """(name, config) of the tensor-parallel candidates: on each of the
  ``TENSOR_PARALLEL_MESHES`` cheapest 2-D meshes (both axes > 1), the
  batch on axis 0 and every parameter and optimizer-state array split on
  the last axis, the ILP choosing the dim (``InputLayout.TENSOR_PARALLEL``).
  The unconstrained ILP reaches these layouts only where its per-op prices
  favour them; on hosts where replicated work costs more than it prices
  (the optimizer update of replicated weights on every device), the
  measured choice needs them in the field."""
  if config.option.force_batch_dim_to_mesh_dim is not None:
    return []
  out = []
  for shape in meshes:
    if len(out) == TENSOR_PARALLEL_MESHES:
      break
    if len(shape) != 2 or min(shape) < 2:
      continue
    option = dataclasses.replace(config.option, force_batch_dim_to_mesh_dim=0)
    out.append(("tensor-parallel", dataclasses.replace(
        config, method_name=f"{config.method_name}[tensor-parallel]",
        layout=InputLayout.TENSOR_PARALLEL, mesh_shapes=(tuple(shape),),
        option=option, mesh_fixed=True)))
  return out


def layout_variants(config: ShardConfig,
                    num_devices: int) -> list[tuple[str, ShardConfig]]:
  """(name, config) of the same pass with fewer choices: the inputs in the
  data-parallel, ZeRO-2 and ZeRO-3 layouts on (n,)."""
  out = []
  for name, layout, reduce_scatter in _LAYOUTS:
    option = dataclasses.replace(config.option, force_data_parallel=True,
                                 prefer_reduce_scatter=reduce_scatter)
    out.append((name, dataclasses.replace(
        config, method_name=f"{config.method_name}[{name}]", layout=layout,
        mesh_shapes=((num_devices,),), option=option, mesh_fixed=True)))
  return out


def _compile(compile_config, name, cfg, profile):
  """(price, name, step) of one candidate, or the error that rules it out."""
  try:
    step = compile_config(cfg)
  except InfeasiblePlanError as e:
    _progress.log(f"compiled-cost selection: {name} has no plan ({e})")
    return e
  except ValueError as e:
    if name == "ilp":
      raise  # the user's own configuration: its error stands
    # e.g. a batch that the mesh axis the candidate splits it on does not
    # divide: that candidate is not a plan here
    _progress.log(f"compiled-cost selection: {name} does not apply ({e})")
    return None
  seconds = price_program(step.task.hlo_text(), profile).seconds
  if name.startswith(("ilp", "tensor-parallel")):
    name = f"{name} {tuple(step.plan.mesh_shape)}"
  _progress.log(f"compiled-cost selection: {name} priced "
                f"{seconds * 1e3:.3f} ms (ILP objective "
                f"{step.plan.predicted_step_seconds * 1e3:.3f} ms)")
  return seconds, name, step


def measured_count(config: ShardConfig, num_candidates: int) -> int:
  """How many of the cheapest candidates are timed (None: all of them)."""
  m = config.option.measure_candidates
  return num_candidates if m is None else min(m, num_candidates)


def select(compile_config: Callable, config: ShardConfig, num_devices: int,
           leaves=None, donated=()):
  """Compiles every candidate with ``compile_config(config)`` (a
  ``CompiledStep``) and returns the cheapest under the profile (or, given
  the call's concrete ``leaves``, the fastest measured of the cheapest
  ``measure_candidates``), its plan carrying every candidate's figures.

  Raises:
    InfeasiblePlanError: no candidate has a plan (the first one's error).
  """
  profile = get_profile(config.option.cost_profile)
  priced, errors = [], []
  first = _compile(compile_config, "ilp", config, profile)
  todo = layout_variants(config, num_devices)
  if isinstance(first, tuple):
    priced.append(first)
    meshes = _distinct_meshes(first[2].planned.candidates)
    todo = (ilp_variants(config, meshes)
            + tensor_parallel_variants(config, meshes) + todo)
  else:
    errors.append(first)
  followed = None  # (price, config, step) of the cheapest batch-split
  while todo:
    name, cfg = todo.pop(0)
    got = _compile(compile_config, name, cfg, profile)
    if isinstance(got, tuple):
      priced.append(got)
      if name == "ilp batch-split" and (followed is None or
                                        got[0] < followed[0]):
        followed = (got[0], cfg, got[2])
    elif got is not None:
      errors.append(got)
    if not todo and followed is not None:
      # the runner-ups of the cheapest priced batch-split candidate
      todo, followed = runner_up_variants(followed[1], followed[2]), None
  if not priced:
    raise errors[0]
  priced.sort(key=lambda p: p[0])
  seconds, name, best = priced[0]
  measured = ()
  k = measured_count(config, len(priced))
  if k > 0 and len(priced) > 1 and leaves is not None and \
      candidate_timing.concrete(leaves):
    # a program compiled twice (two candidates' layouts lowering alike) is
    # timed once, and both are given its time
    timed, twin, by_hlo = {}, {}, {}
    for _, n, step in priced[:k]:
      hlo = step.task.hlo_text()
      if hlo in by_hlo:
        twin[n] = by_hlo[hlo]
      else:
        by_hlo[hlo] = n
        timed[n] = step.task
    with _progress.step(f"compiled-cost selection: timing the {len(timed)} "
                        "cheapest distinct programs on the devices"):
      times = candidate_timing.race(timed, leaves, donated)
    times.update({n: times[t] for n, t in twin.items()})
    measured = tuple(sorted(times.items(), key=lambda kv: kv[1]))
    name = measured[0][0]
    seconds, _, best = next(p for p in priced if p[1] == name)
    _progress.log("compiled-cost selection: measured " + ", ".join(
        f"{n} {t * 1e3:.3f} ms" for n, t in measured))
  _progress.log(f"compiled-cost selection: keeping {name}")
  plan = dataclasses.replace(
      best.plan, compiled_step_seconds=seconds,
      alternatives=tuple((n, s) for s, n, _ in priced), measured=measured)
  return dataclasses.replace(best, plan=plan)
