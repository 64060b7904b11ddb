"""The simulator's hierarchical plan: stages on submeshes, each stage's
intra-op plan from the per-stage ILP (Alpa's stage DP, with gradient
accumulation, 1F1B memory, remat per stage and inter-stage transfers).

Stage model (per micro-batch of ``m`` sequences, ``B = batch / m``):

* time of a stage: the sum of its layers' ILP times on its logical mesh
  (``layer_costs``), + one forward of its layers if it rematerialises, + the
  transfer of its input activation (forward) and of that activation's
  gradient (backward) from the previous stage: ``alpha + bytes * beta`` of
  the link between the two submeshes (inter-node when the stage starts a
  node, intra-node otherwise, spread over the receiving devices).
* once per step: the stage's gradient synchronisation and its optimizer
  update: ``3 + 2 r`` fp32 words per parameter shard at memory bandwidth
  (read parameter and gradient, write the parameter, read and write the
  optimizer state), ``r`` = optimizer-state bytes per parameter byte of
  the config's optimizer (``LayerCostTable.opt_state_ratio``: AdamW 2,
  so 7 words; Adafactor's factored moments a small fraction).
* memory per GPU: fp32 parameters and gradient accumulator (8 bytes per
  parameter shard), the optimizer state (``r`` x 4 bytes per parameter
  shard, split further over the data-parallel axes the parameter is
  replicated on, as the update's sharding can do; the Megatron-LM baseline
  keeps it whole); one layer's bf16 weight copy; with
  1F1B, stage ``k`` of ``S`` holds ``min(S - k, B)`` micro-batches in flight:
  without remat their residuals (the forward values its backward reads),
  with remat only the stage's input per micro-batch in flight, plus, while
  one micro-batch's backward runs, its layers' inputs and one layer's
  residuals.
* step latency: ``sum_k t_k + (B - 1) max_k t_k + max_k step_k``.

The DP (``plan_pipeline``) enumerates the bound on the slowest stage and,
for it, splits the layers into stages with ``f[s][i][d]``: the cheapest
sum of stage times of layers ``[i, K)`` as ``s`` stages on ``d`` devices (the
number of stages after a stage is its in-flight count, so the memory check
is exact). The per-step terms enter its objective as a sum (an upper bound
of their max); the returned latency uses the max.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from alpa_py.bench.layer_costs import LayerCostTable, Mode


@dataclasses.dataclass(frozen=True)
class Stage:
  """One priced stage.

  Attributes:
    units: model layers [start, end) (GPT blocks, MoE block pairs).
    submesh: physical submesh (rows = nodes or 1, devices per row).
    logical: the logical mesh of its intra-op plan.
    mode: how the intra-op plan was found (``layer_costs.Mode``).
    remat: whether its backward recomputes its forward.
    micro_seconds: per micro-batch, transfers included.
    step_seconds: gradient sync + update, once per step.
    memory_bytes: per GPU, at its in-flight count.
    in_flight: micro-batches its 1F1B position holds.
  """

  units: tuple[int, int]
  submesh: tuple[int, int]
  logical: tuple[int, int]
  mode: str
  remat: bool
  micro_seconds: float
  step_seconds: float
  memory_bytes: float
  in_flight: int


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
  """A hierarchical plan and its predicted step."""

  name: str
  stages: tuple[Stage, ...]
  micro_batch: int
  num_micro_batches: int
  step_seconds: float
  fits: bool
  memory_bytes: float  # the largest stage's, per GPU

  def describe(self) -> str:
    groups: list[list] = []
    for s in self.stages:
      key = (s.submesh, s.logical, s.remat)
      if groups and groups[-1][0] == key:
        groups[-1][1] += 1
      else:
        groups.append([key, 1])
    return "; ".join(f"{n}x {sub} as {log}{' remat' if r else ''}"
                     for (sub, log, r), n in groups)


def valid_gpu_counts(per_node: int, nodes: int = 8) -> list[int]:
  return list(range(1, per_node + 1)) + [per_node * n
                                         for n in range(2, nodes + 1)]


def submeshes(num_gpus: int, per_node: int) -> list[tuple[int, int]]:
  """Alpa's submesh space: (1, 2^k) inside a node, (n, per_node) whole
  nodes (n a power of two, or all the nodes).

  Raises:
    ValueError: a GPU count the space does not cover, with the valid ones.
  """
  if num_gpus < 1 or (num_gpus > per_node and num_gpus % per_node):
    raise ValueError(
        f"--gpus {num_gpus}: no submesh space covers it; above one node "
        f"({per_node} GPUs) the count must be a multiple of {per_node}. "
        f"Valid counts: {', '.join(map(str, valid_gpu_counts(per_node)))}, "
        "...")
  out = [(1, 1 << k) for k in range(per_node.bit_length())
         if (1 << k) <= min(num_gpus, per_node)]
  nodes = num_gpus // per_node if num_gpus >= per_node else 0
  for n in range(2, nodes + 1):
    if n & (n - 1) == 0 or n == nodes:
      out.append((n, per_node))
  return out


def logical_shapes(submesh: tuple[int, int], per_node: int):
  """Logical meshes of a submesh: axis 1 stays inside a node."""
  rows, cols = submesh
  size = rows * cols
  if rows == 1:
    return [(a, size // a) for a in range(1, size + 1)
            if size % a == 0 and a <= size // a]
  # 4 or 8 devices of a node on the inner axis, the rest across nodes
  # (2-way inside a node, or every axis across nodes, leave 25 Gb/s links
  # carrying activations or most of the gradients; left out for time)
  return [(size // b, b) for b in (4, 8) if b <= per_node
          and per_node % b == 0]


def mirrored_shapes(submesh: tuple[int, int]):
  """The in-node logical meshes ``logical_shapes`` leaves out (a > b)."""
  size = submesh[0] * submesh[1]
  return [(a, size // a) for a in range(1, size + 1)
          if size % a == 0 and a > size // a]


# the per-stage ILP free, and with Megatron-LM's weight layouts pinned (the
# ILP objective has no memory term; the pinned run gives the stage DP the
# memory-lean plan to fall back on where the free one does not fit)
MODES_ALPA = (Mode.AUTO, Mode.MEGATRON)
# PP-DP (Alpa's Wide-ResNet baseline): the same stage DP, every stage plain
# data parallel (parameters and optimizer state replicated)
MODES_PP_DP = (Mode.DATA,)
# Wide-ResNet under alpa_py: the free ILP, and the ILP with the batch on
# axis 0 (its gradient synchronisation is once per step, which the free
# ILP's per-micro-batch objective cannot see)
MODES_CONV = (Mode.AUTO, Mode.DATA0)


@dataclasses.dataclass
class _Option:
  logical: tuple
  mode: Mode
  remat: bool
  t: float
  step: float
  mem_fixed: float
  mem_per: float


class StageModel:
  """Prices stages of one config at one micro-batch size."""

  def __init__(self, table: LayerCostTable, num_gpus: int,
               budget: float | None):
    self.table = table
    self.prof = table.profile
    self.n = num_gpus
    self.budget = budget if budget is not None else math.inf
    self.units = len(table.layer_map)
    self.B = max(1, table.cfg.batch // table.micro_batch)

  def _layer(self, u, logical, mode):
    return self.table.cost(self.table.layer_map[u], logical, mode)

  def options(self, u0: int, u1: int, logical, mode: Mode,
              shard_moments: bool = True):
    """(no-remat, remat) ``_Option``s of units [u0, u1), no transfer."""
    costs = [self._layer(u, logical, mode) for u in range(u0, u1)]
    if any(math.isinf(c.micro_seconds) for c in costs):
      return []
    t = sum(c.micro_seconds for c in costs)
    fwd = sum(c.fwd_seconds for c in costs)
    params = sum(c.param_bytes for c in costs)
    r = self.table.opt_state_ratio
    step = sum(c.grad_sync_seconds for c in costs) + \
        (3 + 2 * r) * params / self.prof.mem_bytes_per_s
    # Megatron-LM (the baseline) keeps whole moments on every replica
    moments = sum(c.moment_bytes for c in costs) if shard_moments else params
    state = 2 * params + r * moments + max(c.param_bytes for c in costs) / 2
    res = sum(c.residual_bytes for c in costs)
    inputs = [c.input_bytes / 2 for c in costs]  # x (the other half: its grad)
    keep = max(c.residual_bytes for c in costs)
    return [_Option(logical, mode, False, t, step, state, res),
            _Option(logical, mode, True, t + fwd, step,
                    state + sum(inputs) + keep, inputs[0])]

  def transfer(self, u: int, size: int, cross_node: bool) -> float:
    nbytes = self.table.shapes[self.table.layer_map[u]].input_bytes
    p = self.prof
    if cross_node:
      return 2 * p.inter_alpha + nbytes * p.inter_beta
    return 2 * p.intra_alpha + nbytes * p.intra_beta / size

  def price(self, u0, u1, submesh, logical, mode, remat, in_flight,
            cross_node: bool | None, shard_moments: bool = True
            ) -> Stage | None:
    """One stage as given (for baselines); None if it cannot be planned."""
    opts = [o for o in self.options(u0, u1, tuple(logical), mode,
                                    shard_moments)
            if o.remat == remat]
    if not opts:
      return None
    o = opts[0]
    size = submesh[0] * submesh[1]
    t = o.t + (self.transfer(u0, size, cross_node)
               if cross_node is not None else 0.0)
    return Stage((u0, u1), tuple(submesh), tuple(logical), mode.value, remat,
                 t, o.step, o.mem_fixed + min(in_flight, self.B) * o.mem_per,
                 min(in_flight, self.B))


def latency(stages, B: int) -> float:
  ts = [s.micro_seconds for s in stages]
  return sum(ts) + (B - 1) * max(ts) + max(s.step_seconds for s in stages)


def plan_pipeline(model: StageModel, max_layers: int = 16,
                  modes=MODES_ALPA, name: str = "alpa_py") -> PipelinePlan:
  """The stage DP over Alpa's submesh space (see the module doc).

  Returns the fastest plan whose every stage fits the memory budget, or,
  if none fits, the plan that needs the least memory, with ``fits=False``.
  """
  per_node = model.prof.devices_per_node
  N, U, B = model.n, model.units, model.B
  subs = submeshes(N, per_node)
  # DP layers: groups of consecutive units
  K = min(U, max_layers)
  bounds = [round(g * U / K) for g in range(K + 1)]
  S = min(K, N)
  big = math.inf
  # per (i, j, submesh): options
  opt_table = {}
  for i in range(K):
    for j in range(i + 1, K + 1):
      for k, sub in enumerate(subs):
        size = sub[0] * sub[1]
        if (j - i) > U:
          continue
        opts = []
        shapes = logical_shapes(sub, per_node)
        if {Mode.DATA, Mode.DATA0} & set(modes) and (size, 1) not in shapes:
          # the batch-on-axis-0 modes need the whole submesh on axis 0 too
          shapes = shapes + [(size, 1)]
        for logical in shapes:
          for mode in modes:
            if mode == Mode.DATA and logical[1] > 1:
              continue  # plain data parallel: a (d, 1) mesh
            if mode in (Mode.DATA0, Mode.DATA) and logical[0] == 1:
              if logical != (1, 1) or Mode.AUTO in modes:
                continue
              mode = Mode.AUTO  # one device: data parallel is the plan
            # plain data parallel keeps the whole optimizer state on every
            # replica (the other modes may shard it over the data axes)
            opts += model.options(bounds[i], bounds[j], logical, mode,
                                  shard_moments=mode != Mode.DATA)
        # with the batch pinned to axis 0, (dp, tp) and (tp, dp) differ:
        # the other orientations inside a node, for the pinned mode
        if sub[0] == 1 and Mode.MEGATRON in modes:
          for logical in mirrored_shapes(sub):
            opts += model.options(bounds[i], bounds[j], logical,
                                  Mode.MEGATRON)
        opt_table[(i, j, k)] = opts
  s_range = np.arange(S + 1)
  inflight = np.minimum(s_range, B)
  # best time per in-flight count, and the option chosen
  c_t = np.full((K, K + 1, len(subs), S + 1), big)
  c_sum = np.full_like(c_t, big)
  c_arg = {}
  min_mem = np.full((K, K + 1, len(subs), S + 1), big)
  for (i, j, k), opts in opt_table.items():
    for idx, o in enumerate(opts):
      mem = o.mem_fixed + inflight * o.mem_per
      min_mem[i, j, k] = np.minimum(min_mem[i, j, k], mem)
      ok = mem <= model.budget
      better = ok & (o.t < c_t[i, j, k])
      c_t[i, j, k] = np.where(better, o.t, c_t[i, j, k])
      c_sum[i, j, k] = np.where(better, o.t + o.step, c_sum[i, j, k])
      for s in np.nonzero(better)[0]:
        c_arg[(i, j, k, int(s))] = idx
  d_range = np.arange(N + 1)
  offset = N - d_range
  cross = (offset % per_node == 0) & (offset > 0)
  trans = np.zeros((K, len(subs), N + 1))
  for i in range(K):
    for k, sub in enumerate(subs):
      size = sub[0] * sub[1]
      intra = model.transfer(bounds[i], size, False)
      inter = model.transfer(bounds[i], size, True)
      trans[i, k] = np.where(offset == 0, 0.0, np.where(cross, inter, intra))
  aligned = []
  for sub in subs:
    size = sub[0] * sub[1]
    unit = size if size < per_node else per_node
    aligned.append((offset % unit == 0) & (d_range >= size)
                   & ((offset % per_node) + min(size, per_node) <= per_node))

  def run_dp(t_max, use_budget=True):
    f = np.full((S + 1, K + 1, N + 1), big)
    nxt = np.full((S + 1, K + 1, N + 1, 2), -1, dtype=np.int64)
    f[0, K, 0] = 0.0
    ct = c_t if use_budget else None
    for s in range(1, S + 1):
      for i in range(K - 1, -1, -1):
        best = f[s, i]
        for j in range(i + 1, K + 1):
          prev = f[s - 1, j]
          if not np.isfinite(prev).any():
            continue
          for k, sub in enumerate(subs):
            size = sub[0] * sub[1]
            c = ct[i, j, k, s] if use_budget else min_mem[i, j, k, s]
            if not np.isfinite(c):
              continue
            shifted = np.full(N + 1, big)
            shifted[size:] = prev[:N + 1 - size]
            if use_budget:
              stage_t = c + trans[i, k]
              cand = c_sum[i, j, k, s] + trans[i, k] + shifted
              cand = np.where(aligned[k] & (stage_t <= t_max), cand, big)
            else:
              cand = np.where(aligned[k], np.maximum(c, shifted), big)
            better = cand < best
            if better.any():
              best = np.where(better, cand, best)
              nxt[s, i, better] = (j, k)
        f[s, i] = best
    return f, nxt

  def extract(f, nxt, s):
    out, i, d = [], 0, N
    while i < K:
      j, k = nxt[s, i, d]
      out.append((i, int(j), int(k), s))
      d -= subs[k][0] * subs[k][1]
      i, s = int(j), s - 1
    return out

  def build(raw, use_budget=True):
    stages = []
    for i, j, k, s in raw:
      sub = subs[k]
      size = sub[0] * sub[1]
      off = sum(subs[kk][0] * subs[kk][1] for _, _, kk, _ in
                raw[:raw.index((i, j, k, s))])
      opts = opt_table[(i, j, k)]
      if use_budget:
        o = opts[c_arg[(i, j, k, s)]]
      else:
        o = min(opts, key=lambda o: o.mem_fixed + min(s, B) * o.mem_per)
      cross = None if off == 0 else (off % per_node == 0)
      t = o.t + (model.transfer(bounds[i], size, cross)
                 if cross is not None else 0.0)
      stages.append(Stage((bounds[i], bounds[j]), sub, o.logical, o.mode.value,
                          o.remat, t, o.step,
                          o.mem_fixed + min(s, B) * o.mem_per, min(s, B)))
    return stages

  finite = np.unique(c_t[np.isfinite(c_t)])
  cands = []
  for v in finite:
    if not cands or v > cands[-1] * 1.03:
      cands.append(float(v))
  best_total, best_stages = math.inf, None
  for t_max in cands:
    if (B - 1) * t_max > best_total:
      break
    f, nxt = run_dp(t_max * 1.0000001 + 1e-12)
    ss = [s for s in range(1, S + 1) if np.isfinite(f[s, 0, N])]
    for s in ss:
      stages = build(extract(f, nxt, s))
      total = latency(stages, B)
      if total < best_total:
        best_total, best_stages = total, stages
  if best_stages is not None:
    return PipelinePlan(name, tuple(best_stages), model.table.micro_batch, B,
                        best_total, True,
                        max(s.memory_bytes for s in best_stages))
  # nothing fits: the plan needing the least memory
  f, nxt = run_dp(None, use_budget=False)
  ss = [s for s in range(1, S + 1) if np.isfinite(f[s, 0, N])]
  if not ss:
    return PipelinePlan(name, (), model.table.micro_batch, B, math.inf, False,
                        math.inf)
  s = min(ss, key=lambda s: f[s, 0, N])
  stages = build(extract(f, nxt, s), use_budget=False)
  return PipelinePlan(name, tuple(stages), model.table.micro_batch, B,
                      latency(stages, B), False,
                      max(st.memory_bytes for st in stages))
