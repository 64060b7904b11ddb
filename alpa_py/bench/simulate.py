"""Planning large configs on simulated GPU clusters, from abstract shapes.

GPT and MoE: the hierarchical plan (``simulate_hierarchical``: layers, the
stage DP and the per-stage ILP, in ``bench/hierarchical.py``). Wide-ResNet:
the intra-op-only simulation described below (``simulate_intra_op``).

The step is traced on ``jax.ShapeDtypeStruct``s (no parameter is allocated),
the intra-op pass plans it on the logical mesh (nodes, 8) of the chosen
profile, and the predicted step time gives TFLOPS per GPU, printed beside the
published Alpa / Megatron-LM / DeepSpeed / PP-DP figures of
``shared/REFERENCE.md`` (weak scaling: a bigger model per GPU count).

Only the intra-operator pass is simulated here (no pipeline stages), with
float32 parameters and AdamW state (16 bytes per parameter). The global batch
runs as micro-batches of ``per_gpu`` sequences (images) per GPU, as gradient
accumulation would: the step time is the micro-batch's predicted time times
the number of micro-batches (so the optimizer update is counted once per
micro-batch, an overestimate), and the estimated peak memory per device is
the micro-batch plan's, planned under the device's memory as the budget
(``fits`` is False where no plan meets it; the unconstrained plan is then
reported).
"""

from __future__ import annotations

import time

import jax

from alpa_py.bench import configs
from alpa_py import InfeasiblePlanError
from alpa_py.compiler.cluster_env import get_profile
from alpa_py.driver.analysis import StepAnalysis

GPU_COUNTS = (1, 8, 16, 32, 64)
WEAK_SCALING = {
    "gpt": {1: "350M", 8: "2.6B", 16: "6.7B", 32: "15B", 64: "39B"},
    "moe": {1: "380M", 8: "2.4B", 16: "10B", 32: "27B", 64: "70B"},
    "wresnet": {1: "250M", 8: "2B", 16: "4B", 32: "6.8B", 64: "13B"},
}
# TFLOPS per GPU, Alpa (OSDI '22) artifact, 8x V100 per node, 25 Gb/s
PUBLISHED = {
    "gpt": {"Alpa": (45.1, 61.6, 60.0, 59.9, 57.0),
            "Megatron-LM": (47.5, 50.4, 56.6, 58.2, 57.8)},
    "moe": {"Alpa": (45.5, 45.8, 45.4, 38.8, 36.6),
            "DeepSpeed": (34.2, 40.0, 12.9, 3.8, None)},
    "wresnet": {"Alpa": (8.3, 8.0, 6.8, 6.6, 5.3),
                "PP-DP": (8.3, 7.7, 0.37, None, None)},
}


def mesh_for(gpus: int, per_node: int) -> tuple[int, int]:
  return (gpus // per_node, per_node) if gpus > per_node else (1, gpus)


PER_GPU = {"gpt": 2, "moe": 2, "wresnet": 16}


def simulate_intra_op(suite: str, gpus: int, profile: str, *,
                      name: str | None = None, per_gpu: int | None = None,
                      time_limit_s: float = 120.0) -> dict:
  """Intra-op only (one mesh, fp32, no pipeline): predicted step time and
  TFLOPS/GPU of one config on ``gpus`` GPUs (Wide-ResNet's simulation;
  ``hierarchical_one`` plans GPT and MoE)."""
  name = name or WEAK_SCALING[suite][gpus]
  cfg = configs.get_config(suite, name)
  prof = get_profile(profile)
  t0 = time.perf_counter()
  micro = min(cfg.batch, gpus * (per_gpu or PER_GPU[suite]))
  n_micro = max(1, cfg.batch // micro)
  state = configs.make_state(cfg, abstract=True)
  data = configs.make_batch(cfg, abstract=True, batch=micro)
  step = configs.make_step(cfg)
  analysis = StepAnalysis(step, (state, data), num_devices=gpus)
  t_trace = time.perf_counter() - t0
  flops = analysis.matmul_flops()
  shape = mesh_for(gpus, prof.devices_per_node)
  fits = True
  try:
    sol = analysis.solve(shape, profile, memory_budget=prof.memory_per_device,
                         time_limit_s=time_limit_s)
  except InfeasiblePlanError:
    # report the unconstrained plan, marked as not fitting
    fits = False
    sol = analysis.solve(shape, profile, time_limit_s=time_limit_s)
  step_seconds = sol.objective * n_micro
  flops *= n_micro
  tflops = flops / step_seconds / gpus / 1e12
  mem = prof.memory_per_device
  return dict(suite=suite, config=name, gpus=gpus, profile=profile,
              mesh=list(shape), params=sum(int(x.size) for x in
                                           jax.tree_util.tree_leaves(state.params)),
              matmul_flops=flops, micro_batch=micro, num_micro_batches=n_micro,
              predicted_step_seconds=step_seconds,
              predicted_tflops_per_gpu=tflops,
              estimated_peak_bytes=sol.estimated_peak_bytes,
              device_memory=mem,
              fits=fits,
              ilp=dict(status=sol.status, variables=sol.num_variables,
                       nodes=sol.num_nodes, solve_seconds=sol.solve_seconds),
              trace_seconds=t_trace,
              published={k: v[GPU_COUNTS.index(gpus)] for k, v in
                         PUBLISHED[suite].items()} if gpus in GPU_COUNTS else {})


def intra_op_table(rows: list[dict]) -> str:
  lines = [f"{'suite':<8}{'gpus':>5} {'config':>6} {'params':>8} {'mesh':>8} "
           f"{'pred TFLOPS/GPU':>15} {'Alpa':>6} {'ratio':>6} {'other':>18} "
           f"{'est GiB/dev':>11} {'fits':>5} {'ILP s':>6}"]
  for r in rows:
    alpa = r["published"].get("Alpa")
    others = {k: v for k, v in r["published"].items() if k != "Alpa"}
    other = ", ".join(f"{k} {v if v is not None else 'OOM'}" for k, v in others.items())
    ratio = f"{r['predicted_tflops_per_gpu'] / alpa:6.2f}" if alpa else "     -"
    lines.append(
        f"{r['suite']:<8}{r['gpus']:>5} {r['config']:>6} "
        f"{r['params'] / 1e9:7.2f}B {str(tuple(r['mesh'])):>8} "
        f"{r['predicted_tflops_per_gpu']:15.2f} {alpa if alpa else '-':>6} {ratio} "
        f"{other:>18} {r['estimated_peak_bytes'] / 2**30:11.1f} "
        f"{str(r['fits']):>5} {r['ilp']['solve_seconds']:6.1f}")
  return "\n".join(lines)
