"""A discrete-event, trace-driven simulator of a multi-LoRA serving
cluster: the same policy objects as a real cluster (``serve.scheduler``),
one engine per GPU modelled as the engine runs (continuous batching of up
to ``max_batch`` requests, a paged KV pool, a bounded adapter cache,
preemption of the newest requests with re-prefill where they land), and a
per-GPU step-time model.

Figures: throughput (prompt + generated tokens of the run over its span,
as Punica counts it, and generated tokens alone; and the steady rate:
tokens generated while requests still arrive, over the arrival window,
which leaves out the drain after the last arrival, when the cluster is
underloaded whatever the policy), per-request time per
output token ((finish - arrival) / output tokens; p50 and p99), and
GPU-seconds (the sum over GPUs of the time they hold at least one
request).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from typing import Sequence

import numpy as np

from alpa_py.serve.scheduler import GpuView, Policy
from alpa_py.serve.workloads import SimRequest


@dataclasses.dataclass(frozen=True)
class StepTimeModel:
  """Seconds of one engine step: ``fixed + per_row * rows +
  per_context_token * (KV tokens read) + per_adapter * (distinct adapters)
  + per_prefill_token * (tokens prefilled) + adapter_load * (adapters
  loaded into the device cache)``."""

  fixed: float
  per_row: float
  per_context_token: float
  per_adapter: float
  per_prefill_token: float
  adapter_load: float
  source: str

  def seconds(self, rows: int, context: int, distinct: int, prefill: int,
              loads: int) -> float:
    return (self.fixed + self.per_row * rows +
            self.per_context_token * context + self.per_adapter * distinct +
            self.per_prefill_token * prefill + self.adapter_load * loads)

  @classmethod
  def roofline(cls, *, params: float = 6.7e9, layers: int = 32,
               hidden: int = 4096, mlp: int = 11008, rank: int = 16,
               hbm_bytes_per_s: float = 2.0e12, flops_per_s: float = 312e12,
               flops_efficiency: float = 0.5, host_bytes_per_s: float = 25e9,
               launch_seconds: float = 1e-3) -> "StepTimeModel":
    """From vendor figures (default: an A100 80 GB, 2.0 TB/s HBM, 312
    TFLOPS fp16, PCIe 4 x16 at 25 GB/s, serving LLaMA-7B shapes in fp16
    with rank-16 adapters on all seven projections): a decode step reads
    the weights once, each row's KV and each distinct adapter's weights;
    prefill is compute-bound at the stated efficiency; an adapter load
    copies its weights from host memory. Nothing is fitted to a published
    serving figure."""
    per_layer_lora = rank * (4 * (hidden + hidden) + 2 * (hidden + mlp) +
                             (mlp + hidden))
    adapter_bytes = 2.0 * layers * per_layer_lora
    flops_per_token = 2.0 * params
    return cls(
        fixed=2.0 * params / hbm_bytes_per_s + launch_seconds,
        per_row=flops_per_token / flops_per_s,
        per_context_token=2.0 * layers * hidden * 2 / hbm_bytes_per_s,
        per_adapter=adapter_bytes / hbm_bytes_per_s,
        per_prefill_token=flops_per_token / (flops_per_s * flops_efficiency),
        adapter_load=adapter_bytes / host_bytes_per_s,
        source=(f"roofline of vendor figures: {params / 1e9:.1f}B params, "
                f"{layers} layers, hidden {hidden}, rank {rank}, HBM "
                f"{hbm_bytes_per_s / 1e12:.1f} TB/s, {flops_per_s / 1e12:.0f}"
                f" TFLOPS x {flops_efficiency} for prefill, host link "
                f"{host_bytes_per_s / 1e9:.0f} GB/s, {launch_seconds * 1e3:.1f}"
                " ms launch overhead per step"))


@dataclasses.dataclass
class _Req:
  spec: SimRequest
  generated: int = 0
  finish: float | None = None
  admitted: int = -1
  preemptions: int = 0
  routed: bool = False  # its adapter came from adapter routing

  @property
  def context(self) -> int:
    return self.spec.prompt_len + self.generated


class _Gpu:
  def __init__(self, gid, max_batch, num_pages, page_size, cache):
    self.gid = gid
    self.max_batch = max_batch
    self.num_pages = num_pages
    self.page_size = page_size
    self.cache_size = cache
    self.running: list[_Req] = []
    self.pending: list[_Req] = []  # joins at the next step (prefill)
    self.cache: collections.OrderedDict = collections.OrderedDict()
    self.stepping = False
    self.held_since: float | None = None
    self.held_seconds = 0.0
    self.loads = 0

  def pages(self, tokens: int) -> int:
    return math.ceil(tokens / self.page_size)

  def used_pages(self) -> int:
    return sum(self.pages(r.context + 1) for r in self.running + self.pending)

  def view(self) -> GpuView:
    reqs = self.running + self.pending
    return GpuView(self.gid, len(reqs), self.max_batch,
                   self.num_pages - self.used_pages(),
                   frozenset(r.spec.adapter for r in reqs),
                   frozenset(self.cache))


def _percentile(xs, q):
  return float(np.percentile(xs, q)) if len(xs) else float("nan")


def simulate(requests: Sequence[SimRequest], policy: Policy, *, gpus: int,
             model: StepTimeModel, max_batch: int = 32,
             num_pages: int = 4096, page_size: int = 16,
             adapter_cache: int = 64, scan_limit: int = 256,
             adapter_routing=None) -> dict:
  """Serves ``requests`` on ``gpus`` simulated GPUs under ``policy``.

  With ``adapter_routing`` (``serve.AdapterRouting``), a request that
  names no adapter but carries an embedding is routed to an adapter when
  it arrives, and releases its slot when it finishes, as the ``Router``
  does.
  The oldest ``scan_limit`` queued requests are offered to the policy
  whenever a GPU may have gained room (a request arrived, finished or was
  preempted); a request the policy leaves queued keeps its place."""
  policy.reset()
  cluster = [_Gpu(g, max_batch, num_pages, page_size, adapter_cache)
             for g in range(gpus)]
  reqs = [_Req(s) for s in sorted(requests, key=lambda s: s.arrival)]
  queue: collections.deque[_Req] = collections.deque()
  events: list = []  # (time, kind, seq, gid)
  seq = 0
  for r in reqs:
    heapq.heappush(events, (r.spec.arrival, 0, seq, r))
    seq += 1
  admitted = 0
  steps = 0
  preemptions = 0
  now = 0.0
  routed, routed_intended, peak = 0, 0, {}

  dirty = True  # whether a GPU may have gained room since the last dispatch

  def dispatch():
    nonlocal admitted, dirty
    if not queue or not dirty:
      return
    dirty = False
    views = [g.view() for g in cluster]
    kept = collections.deque()
    scanned = 0
    while queue and scanned < scan_limit:
      r = queue.popleft()
      scanned += 1
      gid = policy.choose(r.spec.adapter, math.ceil((r.context + 1) /
                                                    page_size), views)
      if gid is None:
        kept.append(r)
        continue
      g = cluster[gid]
      r.admitted = admitted
      admitted += 1
      g.pending.append(r)
      if g.held_since is None:
        g.held_since = now
      views[gid] = g.view()
    queue.extendleft(reversed(kept))

  def start_steps():
    nonlocal seq, steps, preemptions, dirty
    for g in cluster:
      if g.stepping or not (g.running or g.pending):
        continue
      # every running request's next page, oldest first; the newest are
      # preempted while the pool runs short
      rows = sorted(g.running + g.pending, key=lambda r: r.admitted)
      while rows and sum(g.pages(r.context + 1) for r in rows) > g.num_pages:
        victim = rows.pop()
        victim.preemptions += 1
        preemptions += 1
        queue.appendleft(victim)
        dirty = True
      fresh = {id(r) for r in g.pending}
      new = [r for r in rows if id(r) in fresh]
      g.running = [r for r in rows if id(r) not in fresh]
      g.pending = []
      loads = 0
      for r in rows:
        a = r.spec.adapter
        if a in g.cache:
          g.cache.move_to_end(a)
        else:
          g.cache[a] = True
          loads += 1
          if len(g.cache) > g.cache_size:
            g.cache.popitem(last=False)
      g.loads += loads
      t = model.seconds(rows=len(g.running), context=sum(
          r.context for r in g.running), distinct=len(
              {r.spec.adapter for r in rows}), prefill=sum(
                  r.context for r in new), loads=loads)
      g.running = rows
      g.stepping = True
      steps += 1
      heapq.heappush(events, (now + t, 1, seq, g))
      seq += 1

  done = 0
  window_out = 0  # tokens generated by steps that end by the last arrival
  last_arrival = max(r.spec.arrival for r in reqs)
  drained = None  # (time, finished) when the queue first empties after the
  # last arrival: the completion rate while the cluster was saturated
  while events:
    now, kind, _, obj = heapq.heappop(events)
    if kind == 0:
      spec = obj.spec
      if adapter_routing is not None and spec.adapter < 0 and \
          spec.embedding is not None:
        a = adapter_routing.route(spec.embedding)
        if a >= 0:
          obj.spec = dataclasses.replace(spec, adapter=a)
          obj.routed = True
          routed += 1
          routed_intended += int(a == spec.intended)
          peak[a] = max(peak.get(a, 0), int(adapter_routing.load[a]))
      queue.append(obj)
      dirty = True
    else:
      g = obj
      g.stepping = False
      if now <= last_arrival:
        window_out += len(g.running)
      for r in g.running:
        r.generated += 1
        if r.generated >= r.spec.output_len:
          r.finish = now
          done += 1
          dirty = True
          if r.routed:
            adapter_routing.release(r.spec.adapter)
      g.running = [r for r in g.running if r.finish is None]
      if not g.running and not g.pending and g.held_since is not None:
        g.held_seconds += now - g.held_since
        g.held_since = None
    # everything due at this instant first
    if events and events[0][0] <= now:
      continue
    dispatch()
    start_steps()
    if drained is None and now >= last_arrival and not queue:
      drained = (now, done)
  if done != len(reqs):
    raise RuntimeError(f"{len(reqs) - done} requests never finished "
                       "(a request larger than a GPU's KV pool?)")
  start = min(r.spec.arrival for r in reqs)
  span = max(r.finish for r in reqs) - start
  prompt = sum(r.spec.prompt_len for r in reqs)
  out = sum(r.spec.output_len for r in reqs)
  tpot = [(r.finish - r.spec.arrival) / r.spec.output_len for r in reqs]
  return dict(
      policy=policy.name, gpus=gpus, requests=len(reqs), steps=steps,
      span_seconds=span,
      throughput_tokens_per_s=(prompt + out) / span,
      output_tokens_per_s=out / span,
      steady_output_tokens_per_s=(window_out / (last_arrival - start)
                                  if last_arrival > start else None),
      p50_seconds_per_output_token=_percentile(tpot, 50),
      p99_seconds_per_output_token=_percentile(tpot, 99),
      gpu_seconds=sum(g.held_seconds for g in cluster),
      saturated_requests_per_s=(drained[1] / (drained[0] - start)
                                if drained and drained[0] > start and
                                drained[1] else None),
      preemptions=preemptions,
      adapter_loads=sum(g.loads for g in cluster),
      unnamed_requests=sum(1 for r in reqs if r.spec.embedding is not None),
      routed_requests=routed,
      routed_to_intended=routed_intended,
      peak_routed_per_adapter=max(peak.values(), default=0),
      max_batch=max_batch, num_pages=num_pages, page_size=page_size,
      adapter_cache=adapter_cache, step_time_model=dataclasses.asdict(model))
