"""Choosing among compiled programs by the cost profile's price of each
(``AutoShardingOption.select_by_compiled_cost``).

The ILP prices a traced graph op by op; XLA then fuses elementwise chains,
merges collectives and adds copies around reshardings. Where the profile is
a calibrated model, its price of a compiled program is what was fitted to
measured programs, so it is the better judge of two plans. The candidates
are the ILP's plan (on the logical mesh its objective chose), the ILP with
every batch dim kept on the first mesh axis (Alpa's
``force_batch_dim_to_mesh_dim=0``: data parallel, with the ILP free on the
ops that have no batch dim, such as experts), and the same pass with fewer
choices (the inputs in the data-parallel, ZeRO-2 and ZeRO-3 layouts); each
is compiled as it would be on its own, and the cheapest is kept.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from alpa_py import _progress
from alpa_py.compiler.auto_sharding import InfeasiblePlanError
from alpa_py.compiler.cluster_env import get_profile
from alpa_py.compiler.program_cost import price_program
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


def candidate_configs(config: ShardConfig,
                      num_devices: int) -> list[tuple[str, ShardConfig]]:
  """(name, config) of every candidate: the ILP as configured, the ILP
  with the batch on mesh axis 0, then the constrained layouts on (n,)."""
  out = [("ilp", config)]
  if config.option.force_batch_dim_to_mesh_dim is None:
    out.append(("ilp batch-split", dataclasses.replace(
        config, option=dataclasses.replace(config.option,
                                           force_batch_dim_to_mesh_dim=0))))
  for name, layout, reduce_scatter in _LAYOUTS:
    option = dataclasses.replace(config.option, force_data_parallel=True,
                                 prefer_reduce_scatter=reduce_scatter)
    out.append((name, dataclasses.replace(
        config, method_name=f"{config.method_name}[{name}]", layout=layout,
        mesh_shapes=((num_devices,),), option=option, mesh_fixed=True)))
  return out


def select(compile_config: Callable, config: ShardConfig, num_devices: int):
  """Compiles every candidate with ``compile_config(config)`` (a
  ``CompiledStep``) and returns the cheapest under the profile, its plan
  carrying every candidate's price.

  Raises:
    InfeasiblePlanError: no candidate has a plan (the first one's error).
  """
  profile = get_profile(config.option.cost_profile)
  priced, first_error = [], None
  for name, cfg in candidate_configs(config, num_devices):
    try:
      step = compile_config(cfg)
    except InfeasiblePlanError as e:
      first_error = first_error or e
      _progress.log(f"compiled-cost selection: {name} has no plan ({e})")
      continue
    except ValueError as e:
      if name == "ilp":
        raise  # the user's own configuration: its error stands
      # e.g. a batch that the mesh axis the candidate splits it on does not
      # divide: that candidate is not a plan here
      _progress.log(f"compiled-cost selection: {name} does not apply ({e})")
      continue
    seconds = price_program(step.task.hlo_text(), profile).seconds
    if name.startswith("ilp"):
      name = f"{name} {tuple(step.plan.mesh_shape)}"
    _progress.log(f"compiled-cost selection: {name} priced "
                  f"{seconds * 1e3:.3f} ms (ILP objective "
                  f"{step.plan.predicted_step_seconds * 1e3:.3f} ms)")
    priced.append((seconds, name, step))
  if not priced:
    raise first_error
  seconds, name, best = min(priced, key=lambda p: p[0])
  _progress.log(f"compiled-cost selection: keeping {name}")
  plan = dataclasses.replace(
      best.plan, compiled_step_seconds=seconds,
      alternatives=tuple((n, s) for s, n, _ in priced))
  return dataclasses.replace(best, plan=plan)
