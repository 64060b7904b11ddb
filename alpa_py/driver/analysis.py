"""Pricing plans without compiling them (a documented internal API).

``StepAnalysis`` traces a step once, from concrete or abstract
(``jax.ShapeDtypeStruct``) arguments, and prices plans of it under any cost
profile: the plan a method would choose, or a plan whose input layouts are
fixed by hand (a baseline such as Megatron-LM's). The benchmark harness
(``alpa_py.bench``) uses it to show predicted figures beside measured ones
and to simulate GPU clusters from a laptop.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from alpa_py.compiler.auto_sharding import ShardingSolution, run_auto_sharding
from alpa_py.compiler.cluster_env import LogicalMesh, get_profile
from alpa_py.compiler.graph import OpGraph
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategies.registry import is_heavy
from alpa_py.compiler.strategies.spec import FORBIDDEN_PENALTY, Spec
from alpa_py.driver.batch_args import NoBatch, infer_batch_argnums
from alpa_py.driver.config import ShardConfig
from alpa_py.driver.shard_parallel import plan_step
from alpa_py.driver.signature import (Signature, make_signature,
                                      normalize_argnums, resolve_argnums)
from alpa_py.driver.tracing import TracedStep, trace_step
from alpa_py.methods import ShardParallel


class StepAnalysis:
  """One traced step, priced under cost profiles.

  Args:
    fun: the step.
    args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``s).
    batch_argnums: positions of the batch arguments; default: inferred as
      ``parallelize`` infers them (``driver.batch_args``).
    num_devices: devices plans are made for (no device is touched).

  Attributes:
    sig: the call's ``Signature`` (input paths, shapes, owners).
    traced: the ``TracedStep`` (``traced.graph`` is the ``OpGraph``).
  """

  def __init__(self, fun: Callable, args: Sequence[Any], *,
               batch_argnums: tuple[int, ...] | None = None,
               num_devices: int = 1):
    batch = () if batch_argnums is None else resolve_argnums(
        normalize_argnums("batch_argnums", batch_argnums), len(args),
        "batch_argnums")
    self.sig: Signature
    self.sig, _ = make_signature(args, static=(), donate=(), batch=batch,
                                 devices=tuple(range(num_devices)))
    if batch_argnums is None:
      inferred = infer_batch_argnums(fun, self.sig,
                                     getattr(fun, "__name__", "the step"))
      if isinstance(inferred, NoBatch):
        raise inferred.error("StepAnalysis")
      self.sig = dataclasses.replace(self.sig, batch=inferred)
    self.traced: TracedStep = trace_step(fun, self.sig)
    self.num_devices = num_devices

  @property
  def graph(self) -> OpGraph:
    return self.traced.graph

  def matmul_flops(self) -> float:
    """FLOPs of the step's dots and convolutions."""
    return sum(op.flops for op in self.graph.ops
               if is_heavy(op.name))

  def solve(self, mesh_shape: tuple[int, ...], profile: str, *,
            input_specs: dict[int, list[Spec]] | None = None,
            memory_budget: float | None = None,
            time_limit_s: float = 60.0) -> ShardingSolution:
    """The ILP's plan on one mesh; ``input_specs`` (flat input -> allowed
    specs) fixes input layouts, as a hand-written plan does."""
    option = AutoShardingOption(memory_budget_per_device=memory_budget,
                                solver_time_limit_s=time_limit_s,
                                cost_profile=profile)
    return run_auto_sharding(
        self.graph, LogicalMesh(tuple(mesh_shape), get_profile(profile)),
        option, input_specs=input_specs or {}, aliases=self.traced.graph_aliases,
        alias_penalty=FORBIDDEN_PENALTY if input_specs else 0.0)

  def solve_method(self, method: ShardParallel, profile: str) -> ShardingSolution:
    """The plan ``method`` would choose on ``num_devices`` devices under
    ``profile`` (the cheapest of its candidate meshes)."""
    config = ShardConfig.resolve(method, self.num_devices)
    config = dataclasses.replace(config, option=dataclasses.replace(
        config.option, cost_profile=profile))
    return plan_step(self.traced, self.sig, config,
                     config.memory_budget).solution
