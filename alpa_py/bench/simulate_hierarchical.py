"""One simulated point, planned hierarchically, beside the baselines and
Alpa's published figure.

``hierarchical_one`` prices the benchmark step as Alpa's benchmark wrote
it (GPT and MoE: bf16 compute, fp32 master weights, AdamW / Adafactor,
global batch 1024; Wide-ResNet: fp32, SGD with momentum, 1536 images) on
``gpus`` GPUs of a profile:
for each micro-batch size it builds the per-layer ILP costs
(``layer_costs``), runs the stage DP (``hierarchical.plan_pipeline``), and
keeps the fastest plan that fits the device memory; the baselines
(``baselines``) are priced from the same tables.

TFLOPS/GPU in two conventions:
  * ``ours``: the traced step's dot FLOPs (forward + backward, no
    recomputation) / step time / GPUs;
  * ``alpa``: Alpa's benchmark formula (``alpa/util.py``,
    ``compute_gpt_tflops`` / ``compute_moe_tflops``) with
    ``checkpoint_activations=True`` (recomputation counted as a 4th pass),
    the convention of its published table.
"""

from __future__ import annotations

import dataclasses
import math
import time

from alpa_py.bench import baselines, configs
from alpa_py.bench.hierarchical import (MODES_ALPA, MODES_CONV, PipelinePlan,
                                        StageModel, plan_pipeline, submeshes)
from alpa_py.bench.layer_costs import LayerCostTable, Mode
from alpa_py.bench.simulate import GPU_COUNTS, PUBLISHED, WEAK_SCALING
from alpa_py.compiler.cluster_env import CostProfile, get_profile

# Alpa's published plans where the paper states them (shared/REFERENCE.md)
PUBLISHED_PLANS = {("gpt", 64): "16 stages on (1,4) submeshes",
                   ("gpt", 8): "regression config GPT-2.6B: dp2/op2/pp2"}
MICRO_BATCHES = (1, 2, 4, 8)
# images per micro-batch for Wide-ResNet (global batch 1536; Alpa ran it as
# 24-96 micro-batches)
MICRO_BATCHES_WRESNET = (16, 32, 64)


def pricing_profile(name: str, dtype: str = "bf16") -> CostProfile:
  """The profile at the step's compute precision: matmuls at its
  half-precision rate for a bf16 step; matmuls and convolutions at its fp32
  rates for an fp32 one (Alpa ran Wide-ResNet in fp32)."""
  prof = get_profile(name)
  if dtype == "fp32":
    return dataclasses.replace(
        prof, flops_per_s=prof.single_flops_per_s or prof.flops_per_s,
        conv_flops_per_s=prof.single_conv_flops_per_s or
        prof.conv_flops_per_s)
  if prof.half_flops_per_s is None:
    return prof
  return dataclasses.replace(prof, flops_per_s=prof.half_flops_per_s)


def alpa_flops(cfg: configs.BenchConfig, remat: bool = True) -> float | None:
  """FLOPs of one step by Alpa's benchmark formulas (None for Wide-ResNet:
  Alpa counted XLA's FLOPs of the compiled step, whose convolutions are
  the traced ones)."""
  if cfg.suite == "wresnet":
    return None
  m = cfg.model
  b, s, h, L, v = cfg.batch, cfg.seq, m["hidden"], m["num_layers"], \
      m["vocab_size"]
  if cfg.suite == "gpt":
    factor = 96 if remat else 72
    return factor * b * s * h * h * L * (1 + s / (6 * h)) + 6 * b * s * h * v
  factor = 4 if remat else 3
  mlp, e, g = 4, m["num_experts"], m["group_size"]
  dense = b * s * h * h * (8 + 4 * mlp) + 4 * b * s * s * h
  moe = b * s * h * h * 8 + 4 * b * s * s * h + 8 * b * s * h * h * mlp \
      + 2 * b * s * h * e + 2 * b * s * 2 * g + 2 * b * s * h * 2 * g * 2
  return factor * (dense + moe) * L / 2 + 6 * b * s * h * v


def _plan_row(plan: PipelinePlan | None, flops_ours, flops_alpa, gpus):
  if plan is None:
    return None
  t = plan.step_seconds
  return dict(
      name=plan.name, fits=plan.fits, step_seconds=t,
      tflops_ours=flops_ours / t / gpus / 1e12 if math.isfinite(t) else 0.0,
      tflops_alpa=flops_alpa / t / gpus / 1e12 if math.isfinite(t) else 0.0,
      memory_gib=plan.memory_bytes / 2**30,
      micro_batch=plan.micro_batch, num_micro_batches=plan.num_micro_batches,
      num_stages=len(plan.stages), structure=plan.describe(),
      stages=[dict(units=list(s.units), submesh=list(s.submesh),
                   logical=list(s.logical), mode=s.mode, remat=s.remat,
                   micro_ms=s.micro_seconds * 1e3,
                   step_ms=s.step_seconds * 1e3,
                   memory_gib=s.memory_bytes / 2**30, in_flight=s.in_flight)
              for s in plan.stages])


def breakdown(plan: PipelinePlan, table: LayerCostTable) -> dict:
  """Where the step time goes, term by term: the slowest stage's
  micro-batch split into matmuls (at the profile's rate), non-matmul ops
  (the ILP's one-device time less the matmuls, split over the stage's
  devices; each op priced as one pass over its bytes at memory bandwidth,
  or over its share of its fused region's bytes where the table is
  fusion-aware) and the rest (collectives, transfers, work the plan does not
  split); the pipeline bubble; the once per step terms."""
  if not plan.stages:
    return {}
  st = max(plan.stages, key=lambda s: s.micro_seconds)
  d = st.logical[0] * st.logical[1]
  prof = table.profile
  mm = ew = 0.0
  for u in range(*st.units):
    l = table.layer_map[u]
    ls = table.shapes[l]
    mm += (ls.fwd_flops * (2 if st.remat else 1) + ls.bwd_flops) / d
    # the ILP's own non-matmul time on one device, split over d
    one = table.cost(l, (1, 1), Mode.AUTO).micro_seconds
    ew += (one - (ls.fwd_flops + ls.bwd_flops) / prof.flops_per_s) / d
    if st.remat:
      ew += ls.fwd_bytes / d / prof.mem_bytes_per_s
  mm_s, ew_s = mm / prof.flops_per_s, ew
  B = plan.num_micro_batches
  ts = [s.micro_seconds for s in plan.stages]
  return dict(
      bottleneck_stage=plan.stages.index(st),
      bottleneck_micro_ms=st.micro_seconds * 1e3,
      matmul_ms=mm_s * 1e3, elementwise_ms=ew_s * 1e3,
      comm_other_ms=(st.micro_seconds - mm_s - ew_s) * 1e3,
      steady_seconds=B * max(ts), bubble_seconds=sum(ts) - max(ts),
      once_per_step_seconds=max(s.step_seconds for s in plan.stages))


def hierarchical_one(suite: str, gpus: int, profile: str, *,
                     name: str | None = None,
                     micro_batches=None,
                     baseline: bool = True, max_layers: int = 16,
                     fusion_aware: bool = True) -> dict:
  """The hierarchical plan of one point, its baselines, and the published
  figures. ``fusion_aware`` (the default): the layer ILPs price non-matmul
  ops per fused region (``compiler.fusion``), as XLA runs them on a GPU;
  False prices every op at every byte it reads and writes.

  Raises:
    ValueError: a GPU count no submesh space covers (the message lists the
      valid ones), an unknown config.
  """
  submeshes(gpus, get_profile(profile).devices_per_node)  # the count check
  name = name or WEAK_SCALING[suite][gpus]
  cfg = configs.get_config(suite, name)
  prof = pricing_profile(profile, cfg.dtype)
  t0 = time.perf_counter()
  tables, models = {}, {}

  def model_for(m):
    if m not in models:
      tables[m] = LayerCostTable(cfg, m, prof, fusion_aware=fusion_aware)
      models[m] = StageModel(tables[m], gpus, prof.memory_per_device)
    return models[m]

  plans = []
  if micro_batches is None:
    micro_batches = MICRO_BATCHES_WRESNET if suite == "wresnet" else \
        MICRO_BATCHES
  # Wide-ResNet has no tensor-parallel layouts to pin
  modes = MODES_CONV if suite == "wresnet" else MODES_ALPA
  for m in micro_batches:
    if cfg.batch % m:
      continue
    plans.append(plan_pipeline(model_for(m), max_layers=max_layers,
                               modes=modes))
  fit = [p for p in plans if p.fits]
  chosen = min(fit, key=lambda p: p.step_seconds) if fit else \
      min(plans, key=lambda p: p.memory_bytes)
  t_alpa = time.perf_counter() - t0
  base = None
  t1 = time.perf_counter()
  if baseline:
    extra = sorted({m for m in (1, 2, 4, 8, 16, 32, 64)
                    if cfg.batch % m == 0 and m <= max(8, gpus)})
    if suite == "gpt":
      base = baselines.best(baselines.megatron_grid(
          {m: model_for(m) for m in extra}))
    elif suite == "moe":
      base = baselines.best(baselines.deepspeed_plans(
          {m: model_for(m) for m in extra if m % gpus == 0}))
    else:
      base = baselines.best(baselines.pp_dp_plans(
          {m: model_for(m) for m in micro_batches if cfg.batch % m == 0},
          max_layers=max_layers))
  t_base = time.perf_counter() - t1
  any_table = tables[chosen.micro_batch]
  per_micro = sum(s.fwd_flops + s.bwd_flops for s in any_table.full_shapes())
  flops_ours = per_micro * chosen.num_micro_batches
  flops_alpa = alpa_flops(cfg)
  if flops_alpa is None:
    flops_alpa = flops_ours
  params = sum(s.param_bytes for s in any_table.full_shapes()) / 4
  idx = GPU_COUNTS.index(gpus) if gpus in GPU_COUNTS else None
  published = {k: v[idx] for k, v in PUBLISHED[suite].items()} \
      if idx is not None else {}
  row = dict(
      suite=suite, config=name, gpus=gpus, profile=profile,
      rates=dict(
          compute_dtype=cfg.dtype,
          matmul_flops_per_s=prof.flops_per_s,
          conv_flops_per_s=prof.conv_flops_per_s,
          source=("vendor peak x stated efficiency (cluster_env.GPU_PRESETS:"
                  " half_/single_ rates); not fitted to the published table"),
          mem_bytes_per_s=prof.mem_bytes_per_s,
          intra_beta=prof.intra_beta, inter_beta=prof.inter_beta),
      optimizer=cfg.optimizer,
      optimizer_state_per_param_byte=any_table.opt_state_ratio,
      nonmatmul_pricing=("per fused region (compiler.fusion)" if fusion_aware
                         else "every op at every byte (no fusion)"),
      params=params, device_memory=prof.memory_per_device,
      flops_ours=flops_ours, flops_alpa_convention=flops_alpa,
      plan=_plan_row(chosen, flops_ours, flops_alpa, gpus),
      breakdown=breakdown(chosen, tables[chosen.micro_batch]),
      candidates={p.micro_batch: (p.step_seconds, p.fits) for p in plans},
      baseline=_plan_row(base, flops_ours, flops_alpa, gpus),
      published=published,
      published_plan=PUBLISHED_PLANS.get((suite, gpus)),
      planning_seconds=t_alpa, baseline_seconds=t_base,
      trace_seconds=sum(t.trace_seconds for t in tables.values()),
      ilp_seconds=sum(t.ilp_seconds for t in tables.values()),
      num_ilps=sum(t.num_ilps for t in tables.values()),
      num_unsolved=sum(t.num_unsolved for t in tables.values()))
  return row


def table(rows: list[dict]) -> str:
  """The rows as a markdown table."""
  head = ("| suite | GPUs | config | plan (stages: submesh as logical) | "
          "micro-batch x B | GiB/GPU | fits | step s | TFLOPS/GPU ours | "
          "TFLOPS/GPU Alpa conv. | Alpa published | ratio | baseline "
          "(same model) | baseline TFLOPS (Alpa conv.) | published plan | "
          "plan s |")
  lines = [head, "|" + "---|" * head.count("|")[:-1] if False else
           "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    p, b = r["plan"], r["baseline"]
    alpa = r["published"].get("Alpa")
    ratio = f"{p['tflops_alpa'] / alpa:.2f}" if alpa else "-"
    fits = "yes" if p["fits"] else f"no ({p['memory_gib']:.1f} GiB needed)"
    bstr = f"{b['name']}{'' if b['fits'] else ' (OOM)'}" if b else "-"
    btf = f"{b['tflops_alpa']:.1f}" if b and b["fits"] else "-"
    lines.append(
        f"| {r['suite']} | {r['gpus']} | {r['config']} | "
        f"{p['num_stages']} st: {p['structure']} | "
        f"{p['micro_batch']} x {p['num_micro_batches']} | "
        f"{p['memory_gib']:.1f} | {fits} | {p['step_seconds']:.2f} | "
        f"{p['tflops_ours']:.1f} | {p['tflops_alpa']:.1f} | "
        f"{alpa if alpa else '-'} | {ratio} | {bstr} | {btf} | "
        f"{r['published_plan'] or '-'} | {r['planning_seconds']:.0f}"
        f"+{r['baseline_seconds']:.0f} |")
  return "\n".join(lines)


def breakdown_table(rows: list[dict]) -> str:
  """The term-by-term split of each point's step (``breakdown``)."""
  head = ("| suite | GPUs | slowest stage per micro-batch ms | matmul ms | "
          "non-matmul ms | collectives + transfers + unsplit ms | B x slowest "
          "s | bubble s | once per step s | step s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    b = r["breakdown"]
    lines.append(
        f"| {r['suite']} | {r['gpus']} | {b['bottleneck_micro_ms']:.1f} | "
        f"{b['matmul_ms']:.1f} | {b['elementwise_ms']:.1f} | "
        f"{b['comm_other_ms']:.1f} | {b['steady_seconds']:.2f} | "
        f"{b['bubble_seconds']:.2f} | {b['once_per_step_seconds']:.2f} | "
        f"{r['plan']['step_seconds']:.2f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
  """TFLOPS/GPU in Alpa's convention over the GPU counts: alpa_py's plan,
  the baseline planned by the same model, and the published figures."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  gpus = [r["gpus"] for r in rows]
  fig, ax = plt.subplots(figsize=(6, 4))

  def series(key):
    return [(g, r[key]["tflops_alpa"]) for g, r in zip(gpus, rows)
            if r.get(key) and r[key].get("fits")]
  for key, style, label in (("plan", "o-", "alpa_py plan (predicted)"),
                            ("baseline", "^-", "baseline, same model")):
    pts = series(key)
    if pts:
      ax.plot(*zip(*pts), style, label=label)
  for name in rows[0]["published"]:
    pts = [(g, r["published"].get(name)) for g, r in zip(gpus, rows)
           if r["published"].get(name) is not None]
    if pts:
      ax.plot(*zip(*pts), "s--", label=f"{name} (published)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("GPUs (weak scaling)")
  ax.set_ylabel("TFLOPS per GPU (Alpa's convention)")
  ax.set_title(f"{rows[0]['suite']} on {rows[0]['profile']}: "
               f"{rows[0].get('nonmatmul_pricing', '')}", fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
