"""Our own serving fleet as a planner input: multi-LoRA decoding on GPU
types by price, written in JellyBean's file format so that one loader and
one planner serve both.

The workflow: a source of requests (rate in generated tokens/s) feeds two
operators: ``HotAdapter`` (the hottest adapter's share of the traffic)
and ``OtherAdapters`` (the rest, over many adapters). Variants are the
ones the engine runs (``alpa_py.serve.variants``): the adapters unmerged
at full rank or truncated by SVD (``lora-r16``, ``lora-r8``, ...), and,
for the hot adapter only, merged into the base (``merged``: no LoRA work).
Accuracy: a proxy per (operator, variant) measured by the caller (held-out
next-token accuracy of adapters fine-tuned by
``examples/multi_lora_finetune.py``), combined by the stated rule: the
traffic-weighted mean. Workers: device instances of each GPU type in
``gpu_prices.csv`` (approximate list prices), one tier, free links.

Latency per (operator, worker, variant) comes from the serving
simulator's step-time model (``StepTimeModel.roofline``) with each
device's published peak HBM bandwidth and fp16 FLOPS (``DEVICE_PEAKS``):
the largest batch whose modelled time per output token (a decode step
plus its share of prefill) meets the SLO and whose KV cache fits the
device's memory; the worker's throughput is that batch over that time,
derated by ``headroom`` so that queueing keeps the p99 within the SLO
(``benchmarks/lora_fleet_plan.py`` checks each planned worker in the
simulator at its assigned rate). A device that cannot meet the SLO for a
variant has no latency for it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np

from alpa_py.serve.simulator import StepTimeModel

GPU_PRICES = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "data", "gpu_prices.csv")

# Published peaks (vendor datasheets): HBM bytes/s, dense fp16/bf16 FLOPS.
DEVICE_PEAKS = {
    "H100-80GB": (3.35e12, 989e12, "NVIDIA H100 SXM5 datasheet: 3.35 TB/s "
                  "HBM3, 989 TFLOPS dense BF16"),
    "A100-40GB": (1.555e12, 312e12, "NVIDIA A100 datasheet (40 GB SXM): "
                  "1,555 GB/s HBM2, 312 TFLOPS dense FP16"),
    "A10G-24GB": (600e9, 125e12, "NVIDIA A10 datasheet, taken for AWS's "
                  "A10G: 600 GB/s GDDR6, 125 TFLOPS dense FP16"),
    "L4-24GB": (300e9, 121e12, "NVIDIA L4 datasheet: 300 GB/s GDDR6, 121 "
                "TFLOPS dense FP16"),
}


@dataclasses.dataclass(frozen=True)
class LoraWorkload:
  """The traffic and the served model (LLaMA-7B shapes by default, fp16,
  LoRA on all seven projections at ``rank``)."""

  output_tokens_per_s: float = 4096.0
  prompt_len: int = 256
  output_len: int = 256
  hot_share: float = 0.38  # top adapter of Zipf(1.5) over many adapters
  other_adapters: int = 63
  params: float = 6.7e9
  layers: int = 32
  hidden: int = 4096
  mlp: int = 11008
  rank: int = 16

  def kv_bytes_per_token(self) -> float:
    return 2.0 * self.layers * self.hidden * 2  # K and V, fp16

  def adapter_bytes(self, rank: int) -> float:
    per_layer = rank * (4 * 2 * self.hidden + 2 * (self.hidden + self.mlp) +
                        (self.mlp + self.hidden))
    return 2.0 * self.layers * per_layer


def read_gpu_prices(path: str = GPU_PRICES) -> dict:
  """device -> (usd per device-hour, memory GiB), from gpu_prices.csv."""
  with open(path) as f:
    rows = [r for r in csv.reader(line for line in f
                                  if not line.startswith("#"))]
  head, body = rows[0], rows[1:]
  i_dev, i_usd = head.index("device"), head.index("usd_per_device_hour")
  i_mem = head.index("memory_gib")
  return {r[i_dev]: (float(r[i_usd]), float(r[i_mem])) for r in body if r}


def device_profile(device: str, memory_gib: float, variant_rank: int,
                   distinct: int, work: LoraWorkload, slo_tpot_s: float,
                   max_batch: int = 32, headroom: float = 0.8,
                   memory_fraction: float = 0.9):
  """``(batch, usable output tokens/s, modelled s per output token,
  StepTimeModel)`` of one device serving one variant (``variant_rank``
  0: merged, no LoRA), ``distinct``: adapters in a full batch; ``None``
  when no batch meets the SLO or fits."""
  hbm, flops, _ = DEVICE_PEAKS[device]
  model = StepTimeModel.roofline(
      params=work.params, layers=work.layers, hidden=work.hidden,
      mlp=work.mlp, rank=max(variant_rank, 1), hbm_bytes_per_s=hbm,
      flops_per_s=flops)
  if variant_rank == 0:
    model = dataclasses.replace(model, per_adapter=0.0, adapter_load=0.0)
  free = memory_gib * 2 ** 30 * memory_fraction - 2.0 * work.params
  free -= min(distinct, max_batch) * work.adapter_bytes(variant_rank)
  per_request = (work.prompt_len + work.output_len) * work.kv_bytes_per_token()
  fit = min(max_batch, int(free // per_request)) if free > 0 else 0
  best = None
  for b in range(1, fit + 1):
    context = b * (work.prompt_len + work.output_len / 2)
    step = model.seconds(b, int(context), min(b, distinct), 0, 0)
    # each request's prompt is prefilled once over its output_len steps
    step += model.per_prefill_token * work.prompt_len * b / work.output_len
    if step <= slo_tpot_s:
      best = (b, headroom * b / step, step, model)
  return best


def write_lora_fleet(out_dir: str, accuracy: dict, work: LoraWorkload, *,
                     slo_tpot_s: float, threshold: float,
                     prices: dict | None = None, max_batch: int = 32,
                     headroom: float = 0.8, instances: int | None = None
                     ) -> dict:
  """Writes the fleet's planner inputs (JellyBean's format) to
  ``out_dir``; returns ``{(operator, device, variant): profile}``.

  Args:
    accuracy: ``{(operator, variant): accuracy}`` for operators
      ``HotAdapter`` and ``OtherAdapters``; variants ``merged`` or
      ``lora-r<k>`` (``merged`` for ``HotAdapter`` only).
    threshold: on the traffic-weighted accuracy.
    instances: instances of each device type (default: enough of the
      slowest feasible kind to carry the whole rate, plus one).
  """
  prices = prices or read_gpu_prices()
  ops = {"HotAdapter": (work.hot_share, 1),
         "OtherAdapters": (1 - work.hot_share, work.other_adapters)}
  for (op, var) in accuracy:
    if op not in ops:
      raise ValueError(f"accuracy names operator {op!r}; expected one of "
                       f"{sorted(ops)}")
    if var != "merged" and not var.startswith("lora-r"):
      raise ValueError(f"variant {var!r} must be 'merged' or 'lora-r<k>'")
    if var == "merged" and op != "HotAdapter":
      raise ValueError("only HotAdapter has a merged variant")
  profiles = {}
  for (op, var) in accuracy:
    rank = 0 if var == "merged" else int(var[len("lora-r"):])
    for dev in DEVICE_PEAKS:
      if dev not in prices:
        continue
      p = device_profile(dev, prices[dev][1], rank,
                         0 if rank == 0 else ops[op][1], work, slo_tpot_s,
                         max_batch, headroom)
      if p is not None:
        profiles[(op, dev, var)] = p
  if instances is None:
    slowest = min((p[1] for p in profiles.values()), default=1.0)
    instances = math.ceil(work.output_tokens_per_s / slowest) + 1
  os.makedirs(out_dir, exist_ok=True)

  def write(name, rows):
    with open(os.path.join(out_dir, name), "w", newline="") as f:
      csv.writer(f).writerows(rows)

  devices = [d for d in DEVICE_PEAKS if d in prices]
  workers = {d: [f"{d}#{i}" for i in range(instances)] for d in devices}
  write("workers_specs.csv", [(w, prices[d][0]) for d in devices
                              for w in workers[d]])
  write("logical_graph.csv", [("Requests", op) for op in ops])
  write("throughput_normalization_ratios.csv",
        [("Requests", op, share) for op, (share, _) in ops.items()])
  write("input_injection_rates.csv",
        [("Requests", work.output_tokens_per_s)])
  write("message_sizes.csv", [("Requests", op, "default", "default", 0.004)
                              for op in ops])  # a token id per item, KB
  write("execution_profile.csv",
        [(op, w, var, 1000.0 / p[1]) for (op, dev, var), p in
         sorted(profiles.items()) for w in workers[dev]])
  # a variant no device can serve within the SLO is left out
  names = {op: sorted({v for (o, _, v) in profiles if o == op}) for op in ops}
  for op in ops:
    if not names[op]:
      raise ValueError(f"no device meets the SLO ({slo_tpot_s * 1e3:g} ms "
                       f"per output token) for any variant of {op}")
  table = [{"variants": [hv, ov],
            "accuracy": ops["HotAdapter"][0] * accuracy[("HotAdapter", hv)] +
            ops["OtherAdapters"][0] * accuracy[("OtherAdapters", ov)]}
           for hv in names["HotAdapter"] for ov in names["OtherAdapters"]]
  with open(os.path.join(out_dir, "accuracy_profiles.json"), "w") as f:
    json.dump({"end_to_end": {"operators": ["HotAdapter", "OtherAdapters"],
                              "accuracy": table},
               "operators": {op: {"variants": names[op]} for op in ops}},
              f, indent=1)
  with open(os.path.join(out_dir, "accuracy_requirement.json"), "w") as f:
    json.dump({"sink": "OtherAdapters", "threshold": threshold}, f)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write("# Multi-LoRA fleet planner inputs (written by "
            "alpa_py.serve.planner.fleet)\n\n"
            f"Workload: {work}\n\nSLO: modelled time per output token <= "
            f"{slo_tpot_s * 1e3:g} ms; headroom {headroom}; max batch "
            f"{max_batch}; {instances} instances per device type.\n\n"
            "Device peaks:\n" + "".join(
                f"- {d}: {DEVICE_PEAKS[d][2]}\n" for d in devices) +
            "\nPrices: gpu_prices.csv (approximate 2024 list prices).\n")
  return profiles


def simulate_worker(profile, op, var, rate, work, requests=300, seed=0):
  """One planned worker alone in the serving simulator at ``rate`` output
  tokens/s (Poisson arrivals; the hot adapter's requests all name adapter
  0, or none when merged; the others' spread uniformly over
  ``work.other_adapters``): its p99 time per output token (ms) and its
  output tokens/s while requests arrive."""
  from alpa_py.serve import scheduler, simulator
  from alpa_py.serve.workloads import SimRequest

  batch, _, _, model = profile
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(work.output_len / rate, size=requests)
  adapters = (np.full(requests, -1 if var == "merged" else 0)
              if op == "HotAdapter" else
              1 + rng.integers(work.other_adapters, size=requests))
  reqs = [SimRequest(i, float(t), int(a), work.prompt_len, work.output_len)
          for i, (t, a) in enumerate(zip(np.cumsum(gaps), adapters))]
  page = 16
  pages = batch * -(-(work.prompt_len + work.output_len + 1) // page)
  r = simulator.simulate(reqs, scheduler.Punica(), gpus=1, model=model,
                         max_batch=batch, num_pages=pages, page_size=page,
                         adapter_cache=max(1, batch))
  return dict(p99_tpot_ms=1e3 * r["p99_seconds_per_output_token"],
              output_tokens_per_s=r["steady_output_tokens_per_s"])
