"""Baselines planned by the simulator's own stage model.

* Megatron-LM 3-D parallelism (GPT): a grid over tensor (inside a node),
  pipeline (dividing the layer count) and data degrees and micro-batch
  sizes, remat on, 1F1B; each stage's layers priced by the per-stage ILP
  with Megatron's weight layouts pinned (``Mode.MEGATRON``).
* PP-DP (Wide-ResNet): the stage DP with every stage plainly data parallel
  (parameters and optimizer state replicated, batch split).
* DeepSpeed-MoE style (MoE): no pipeline; experts split over all GPUs
  (expert parallel), every other weight data parallel with ZeRO-2 (gradients
  and optimizer state sharded) or ZeRO-3 (parameters too, all-gathered in bf16
  for the forward and again for the backward of every micro-batch).

Both use ``hierarchical.StageModel``'s pricing, so that they are compared
with alpa_py's plan under the same model.
"""

from __future__ import annotations

import math

from alpa_py.bench.hierarchical import (MODES_PP_DP, PipelinePlan, Stage,
                                        StageModel, latency, plan_pipeline)
from alpa_py.bench.layer_costs import Mode
from alpa_py.compiler.cluster_env import LogicalMesh


def megatron_grid(models: dict[int, StageModel]) -> list[PipelinePlan]:
  """Every Megatron-LM configuration of the grid, priced (fitting or not).

  Args:
    models: micro-batch size -> its ``StageModel``.
  """
  any_model = next(iter(models.values()))
  N, U = any_model.n, any_model.units
  per_node = any_model.prof.devices_per_node
  plans = []
  for tp in (1, 2, 4, 8):
    if tp > min(N, per_node):
      continue
    for pp in range(1, min(U, N // tp) + 1):
      if U % pp or (N // tp) % pp:
        continue
      dp = N // tp // pp
      size = dp * tp
      if size > per_node and size % per_node:
        continue
      sub = (1, size) if size <= per_node else (size // per_node, per_node)
      logical = (dp, tp)
      # no ZeRO: fp32 parameter, gradient and optimizer state (16 bytes
      # per parameter with AdamW) over tp x pp GPUs; a configuration over
      # the budget on that alone is not priced
      params = sum(any_model.table.shapes[k].param_bytes
                   for k in any_model.table.layer_map) / 4
      words = 2 + any_model.table.opt_state_ratio
      if 4 * words * params / (tp * pp) > any_model.budget:
        continue
      for m, model in models.items():
        if m % dp:
          continue
        per = U // pp
        stages = []
        for k in range(pp):
          off = k * size
          cross = None if k == 0 else (off % per_node == 0)
          st = model.price(k * per, (k + 1) * per, sub, logical, Mode.MEGATRON,
                           True, pp - k, cross, shard_moments=False)
          if st is None:
            break
          stages.append(st)
        if len(stages) < pp:
          continue
        B = model.B
        mem = max(s.memory_bytes for s in stages)
        plans.append(PipelinePlan(f"megatron dp{dp} tp{tp} pp{pp}",
                                  tuple(stages), m, B, latency(stages, B),
                                  mem <= model.budget, mem))
  return plans


def deepspeed_plans(models: dict[int, StageModel]) -> list[PipelinePlan]:
  """DeepSpeed-MoE style plans (ZeRO-2 and ZeRO-3, remat off and on)."""
  plans = []
  for m, model in models.items():
    N, U = model.n, model.units
    per_node = model.prof.devices_per_node
    if m % N:
      continue
    logical = (1, N)
    sub = (1, N) if N <= per_node else (N // per_node, per_node)
    costs = [model._layer(u, logical, Mode.EXPERT) for u in range(U)]
    if any(math.isinf(c.micro_seconds) for c in costs):
      continue
    full = sum(model.table.shapes[model.table.layer_map[u]].param_bytes
               for u in range(U))
    dev = sum(c.param_bytes for c in costs)
    # fp32 bytes: dense = replicated part, experts = split part
    # (dev = dense + experts / N)
    dense = (N * dev - full) / (N - 1) if N > 1 else full
    experts = full - dense
    mesh = LogicalMesh(logical, model.prof)
    for zero in (2, 3):
      for remat in (False, True):
        opts = [model.options(u, u + 1, logical, Mode.EXPERT)[int(remat)]
                for u in range(U)]
        t = sum(o.t for o in opts)
        step = sum(o.step for o in opts)
        # bytes of fp32 words: parameter, gradient, and r words of
        # optimizer state per parameter word
        r = model.table.opt_state_ratio
        if zero == 2:
          state = dense + (1 + r) * dense / N + (2 + r) * experts / N
        else:
          state = (2 + r) * (dense + experts) / N
          # bf16 gathers of the dense weights, forward and backward
          t += 2 * mesh.all_gather(dense / 2, 1)
        if remat:  # one micro-batch: its layers' inputs + one layer's
          act = sum(c.input_bytes / 2 for c in costs) + max(
              c.residual_bytes for c in costs)
        else:
          act = sum(c.residual_bytes for c in costs)
        mem = state + act + max(c.param_bytes for c in costs) / 2
        st = Stage((0, U), sub, logical, f"expert+zero{zero}", remat, t, step,
                   mem, 1)
        plans.append(PipelinePlan(
            f"deepspeed zero{zero}{' remat' if remat else ''}", (st,), m,
            model.B, latency([st], model.B), mem <= model.budget, mem))
  return plans


def pp_dp_plans(models: dict[int, StageModel],
                max_layers: int = 16) -> list[PipelinePlan]:
  """PP-DP (Alpa's Wide-ResNet baseline): pipeline stages on submeshes,
  each plainly data parallel on a (d, 1) mesh, partitioned by the same
  stage DP."""
  return [plan_pipeline(m, max_layers=max_layers, modes=MODES_PP_DP,
                        name="pp-dp") for m in models.values()]


def best(plans: list[PipelinePlan]) -> PipelinePlan | None:
  """The fastest fitting plan, else the one needing the least memory."""
  fit = [p for p in plans if p.fits]
  if fit:
    return min(fit, key=lambda p: p.step_seconds)
  return min(plans, key=lambda p: p.memory_bytes) if plans else None
