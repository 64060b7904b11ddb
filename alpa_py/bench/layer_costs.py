"""Per-layer costs for the simulator: the per-stage intra-op ILP on each
logical mesh, from abstract shapes.

The benchmark step (``configs.make_pipeline_step``: bf16 compute, fp32
master weights, AdamW, the gradient marked with ``alpa_py.value_and_grad``)
is traced at one micro-batch size with the model's pipeline boundary
markers, and cut into layers by PipeshardParallel's own passes
(``accumulation.partition``, ``layers.assign_layers`` with
``ManualLayerOption``). A layer is one transformer block (GPT) or one
dense + MoE block pair (MoE).

Identical layers reuse their costs: a layer is keyed by its op signature
(op names and shapes, ``stage_construction._signature``). The step is traced
with the model's distinct layers only (the first, with the embedding; one
middle layer; the last, with the head and the loss): every middle layer of
the full model has the same signature (``tests/test_simulate_hierarchical``
checks this on a small config), so its cost is the traced middle layer's.

Each (layer, logical mesh, mode) is solved by ``solve_stage`` (the per-stage
ILP PipeshardParallel runs). The ILP charges a data-parallel gradient
all-reduce on every micro-batch; with gradient accumulation it happens once
per step, so it is taken out of the per-micro-batch time (``grad_sync``,
computed from the chosen specs: for each weight gradient, an all-reduce of
its shard over each data-parallel mesh axis it is replicated on) and
charged once per step by the stage model.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time

import jax

from alpa_py.bench import configs
from alpa_py.bench.plans import expert_spec, megatron_spec
from alpa_py.compiler import accumulation
from alpa_py.compiler.auto_sharding import InfeasiblePlanError, run_auto_sharding
from alpa_py.compiler.cluster_env import CostProfile, LogicalMesh
from alpa_py.compiler.layers import (AutoLayerOption, ManualLayerOption,
                                     assign_layers)
from alpa_py.compiler.options import AutoShardingOption
from alpa_py.compiler.strategies.registry import is_heavy
from alpa_py.compiler.strategies.spec import num_shards
from alpa_py.driver.signature import make_signature
from alpa_py.driver.stage_construction import (Pieces, _signature,
                                               _stage_graphs)
from alpa_py.driver.tracing import trace_step
from alpa_py.models.wide_resnet import DEPTHS


class Mode(str, enum.Enum):
  """How a layer's intra-op plan is found on a logical mesh."""

  AUTO = "auto"  # the ILP, free
  DATA0 = "data0"  # the ILP with every batch dim on mesh axis 0
  MEGATRON = "megatron"  # batch on axis 0, Megatron-LM weight specs on axis 1
  EXPERT = "expert"  # 1-D mesh: batch and the expert dim over it (DeepSpeed)
  # plain data parallel (PP-DP's stages): batch on axis 0, every parameter
  # replicated (the stage model uses it on (d, 1) meshes only)
  DATA = "data"


@dataclasses.dataclass(frozen=True)
class LayerShape:
  """What the stage model needs of one layer, independent of the mesh.

  Attributes:
    signature: hash of the layer's op signature.
    fwd_flops, bwd_flops: matmul FLOPs of one micro-batch.
    fwd_bytes: bytes the forward's non-matmul ops touch (remat pricing).
    bwd_bytes: the same for the backward.
    param_bytes: the layer's fp32 parameters.
    input_bytes: the activation entering the layer (one micro-batch).
  """

  signature: int
  fwd_flops: float
  bwd_flops: float
  fwd_bytes: float
  bwd_bytes: float
  param_bytes: float
  input_bytes: float


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """One layer on one logical mesh, per device.

  Attributes:
    micro_seconds: forward + backward of one micro-batch (ILP objective,
      less the gradient all-reduce).
    grad_sync_seconds: the gradient all-reduce, once per step.
    fwd_seconds: the forward alone (what remat recomputes).
    param_bytes: fp32 parameter shard per device.
    moment_bytes: the parameter shard per device further split over the
      data-parallel axes it is replicated on (where the update keeps its
      optimizer state: ``LayerCostTable.opt_state_ratio`` bytes of state per
      byte of it).
    residual_bytes: forward values the backward reads, one micro-batch.
    input_bytes: the layer's input activation shard, one micro-batch.
    ilp_seconds: solver wall time.
    strategy: a short description (the data-parallel axes).
  """

  micro_seconds: float
  grad_sync_seconds: float
  fwd_seconds: float
  param_bytes: float
  moment_bytes: float
  residual_bytes: float
  input_bytes: float
  ilp_seconds: float
  strategy: str


INFEASIBLE = LayerCost(math.inf, math.inf, math.inf, math.inf, math.inf,
                       math.inf, math.inf, 0.0, "infeasible")


def _tree_bytes(tree) -> float:
  return float(sum(x.size * x.dtype.itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


def _split_pre(pre, body):
  """(pre ops the micro-batch needs, pre ops only the update needs).

  The batch-independent ops include the update's gradient-free part (the
  AdamW moments' decay, the step count); a pipeline would place them in the
  last layer, so they are moved to the once-per-step update here."""
  needed = {t for op in body for t in op.inputs if isinstance(t, int)}
  keep = []
  for op in reversed(pre):
    if any(t in needed for t in op.outputs):
      keep.append(op)
      needed.update(t for t in op.inputs if isinstance(t, int))
  kept = {op.index for op in keep}
  return [op for op in pre if op.index in kept], \
      [op for op in pre if op.index not in kept]


def units_per_layer(cfg: configs.BenchConfig) -> int:
  return cfg.model.get("moe_every", 2) if cfg.suite == "moe" else 1


def num_units(cfg: configs.BenchConfig) -> int:
  """Pipeline units of the config: transformer layers (an MoE unit is a
  dense and an MoE layer), or Wide-ResNet's bottleneck blocks."""
  if cfg.suite == "wresnet":
    return sum(DEPTHS[cfg.model["depth"]])
  return cfg.model["num_layers"] // units_per_layer(cfg)


class LayerCostTable:
  """Costs of a config's distinct layers at one micro-batch size.

  Args:
    cfg: the benchmark config.
    micro_batch: sequences per micro-batch.
    profile: the cost profile (matmuls priced at its half-precision rate).
    time_limit_s: per-ILP limit.
    proxy: trace the distinct layers only (first, one middle, last);
      False: every layer (tests compare the two). Wide-ResNet's blocks
      differ from stage to stage (channels, stride), so it is always
      traced whole.
    fusion_aware: price non-matmul ops by the bytes they move once XLA has
      fused them (``AutoShardingOption.fusion_aware_bytes``), as XLA does
      on a GPU; False: every op at every byte it reads and writes.
  """

  def __init__(self, cfg: configs.BenchConfig, micro_batch: int,
               profile: CostProfile, time_limit_s: float = 10.0,
               proxy: bool = True, fusion_aware: bool = False):
    self.cfg, self.micro_batch, self.profile = cfg, micro_batch, profile
    self.time_limit_s = time_limit_s
    self.fusion_aware = fusion_aware
    t0 = time.perf_counter()
    per = units_per_layer(cfg)
    proxy = proxy and cfg.suite != "wresnet"
    traced_cfg = configs.with_layers(
        cfg, min(cfg.model["num_layers"], 3 * per)) if proxy else cfg
    state = configs.make_state(traced_cfg, abstract=True, pipeline=True)
    # optimizer-state bytes per parameter byte (AdamW: 2, its two moments;
    # Adafactor: its factored second moments, a small fraction)
    self.opt_state_ratio = _tree_bytes(state.opt_state) / \
        _tree_bytes(state.params)
    batch = configs.make_batch(traced_cfg, abstract=True, batch=micro_batch)
    step = configs.make_pipeline_step(traced_cfg)
    self.sig, _ = make_signature((state, batch), static=(), donate=(),
                                 batch=(1,), devices=(0,))
    traced = trace_step(step, self.sig)
    graph = traced.graph
    part = accumulation.partition(graph, self.sig.batch_inputs, 1,
                                  traced.out_names)
    pre, post = _split_pre(part.pre, part.body)
    pipe = sorted(pre + list(part.body), key=lambda o: o.index)
    one = num_units(traced_cfg) <= 1  # no boundary to cut at
    layers = assign_layers(graph, pipe, AutoLayerOption(layer_num=1) if one
                           else ManualLayerOption())
    post = sorted(post + list(part.post), key=lambda o: o.index)
    self.pieces = Pieces(graph, layers, pipe, post, part.marked)
    self.forced = Pieces(graph, layers, pipe, post, part.marked,
                         batch_dims=traced.batch_dims)
    self.paths = dict(zip(graph.invars, self.sig.paths))
    self.batch_ids = {graph.invars[i] for i in self.sig.batch_inputs}
    self.trace_seconds = time.perf_counter() - t0
    self.ilp_seconds = 0.0
    self.num_ilps = 0
    self.num_unsolved = 0
    self._graphs = {}
    self._cache: dict = {}
    n = layers.num_layers
    # traced layer index of each of the full model's layers
    full = num_units(cfg)
    if not proxy:
      self.layer_map = list(range(n))
    else:
      self.layer_map = [0] + [min(1, n - 1)] * (full - 2) + [n - 1] \
          if full > 1 else [0]
    self.shapes = [self._shape(l) for l in range(n)]

  # -- mesh-independent facts -------------------------------------------

  def graphs(self, l: int):
    if l not in self._graphs:
      self._graphs[l] = _stage_graphs(self.pieces, l, l + 1)
    return self._graphs[l]

  def _is_param(self, t: int) -> bool:
    return t in self.paths and t not in self.batch_ids

  def _activation_inputs(self, joint) -> list[int]:
    return [t for t in joint.invars if not self._is_param(t)
            and joint.tensor(t).shape[:1] == (self.micro_batch,)]

  def _shape(self, l: int) -> LayerShape:
    joint, gf, gb = self.graphs(l)
    fwd_flops = sum(op.flops for op in gf.ops if is_heavy(op.name))
    bwd_flops = sum(op.flops for op in gb.ops if is_heavy(op.name))
    fwd_bytes = sum(op.bytes_accessed for op in gf.ops
                    if not is_heavy(op.name))
    bwd_bytes = sum(op.bytes_accessed for op in gb.ops
                    if not is_heavy(op.name))
    params = sum(joint.tensor(t).nbytes for t in joint.invars
                 if self._is_param(t))
    inputs = sum(joint.tensor(t).nbytes for t in self._activation_inputs(joint))
    return LayerShape(hash(_signature(joint)), fwd_flops, bwd_flops, fwd_bytes,
                      bwd_bytes, params, inputs)

  def full_shapes(self) -> list[LayerShape]:
    """The full model's layers (middle ones share the traced middle's)."""
    return [self.shapes[k] for k in self.layer_map]

  # -- per mesh -----------------------------------------------------------

  def _input_specs(self, joint, mesh_shape, mode: Mode) -> dict:
    specs = {}
    for pos, t in enumerate(joint.invars):
      shape = joint.tensor(t).shape
      if mode == Mode.MEGATRON and self._is_param(t):
        pspec = megatron_spec(self.paths[t][len("arg0"):], shape, mp="y")
      elif mode == Mode.EXPERT and self._is_param(t):
        pspec = expert_spec(self.paths[t][len("arg0"):], shape, ep="y")
      elif mode == Mode.DATA and self._is_param(t):
        pspec = ()
      else:
        continue
      entries = tuple(pspec) + (None,) * (len(shape) - len(tuple(pspec)))
      spec = tuple(() if e is None else (1,) for e in entries)
      if any(s and shape[d] % mesh_shape[1] for d, s in enumerate(spec)):
        spec = ((),) * len(shape)
      specs[pos] = [spec]
    return specs

  def cost(self, l: int, logical: tuple[int, int], mode: Mode) -> LayerCost:
    """Traced layer ``l`` on ``logical`` under ``mode`` (cached by the
    layer's signature)."""
    key = (self.shapes[l].signature, tuple(logical), mode)
    if key not in self._cache:
      self._cache[key] = self._solve(l, tuple(logical), mode)
    return self._cache[key]

  def _solve(self, l, logical, mode: Mode) -> LayerCost:
    joint, gf, gb = self.graphs(l)
    mesh = LogicalMesh(logical, self.profile)
    data_axis = 1 if mode == Mode.EXPERT else 0
    forced = mode != Mode.AUTO
    if forced and self.micro_batch % logical[data_axis]:
      return INFEASIBLE
    option = AutoShardingOption(
        cost_profile=self.profile, solver_time_limit_s=self.time_limit_s,
        force_batch_dim_to_mesh_dim=data_axis if forced else None,
        fusion_aware_bytes=self.fusion_aware)
    t0 = time.perf_counter()
    try:
      sol = run_auto_sharding(
          joint, mesh, option,
          input_specs=self._input_specs(joint, logical, mode),
          batch_dims=self.forced.batch_dims if forced else None)
    except (InfeasiblePlanError, ValueError, TypeError):
      # no plan for this candidate: a layout the mesh cannot take, or no
      # solution within the time limit (the solver's message for that case
      # formats the absent memory budget and raises TypeError)
      self.num_unsolved += 1
      return INFEASIBLE
    finally:
      self.ilp_seconds += time.perf_counter() - t0
      self.num_ilps += 1
    wall = time.perf_counter() - t0
    spec_of = sol.spec_of
    shape = tuple(logical)

    def dev_bytes(t):
      spec = spec_of.get(t)
      n = num_shards(spec, shape) if spec is not None else 1
      return joint.tensor(t).nbytes / n

    acts = self._activation_inputs(joint)
    data_axes = set()
    for t in acts:
      spec = spec_of.get(t)
      if spec:
        data_axes.update(a for a in spec[0] if shape[a] > 1)
    marked = set(self.pieces.marked)
    sync = 0.0
    for t in joint.outvars:
      if not isinstance(t, int) or t not in marked:
        continue
      spec = spec_of.get(t) or ((),) * len(joint.tensor(t).shape)
      used = {a for dim in spec for a in dim}
      for a in data_axes:
        # replicated on a data axis: all-reduced; split on it: the ILP
        # reduce-scattered it
        sync += mesh.reduce_scatter(dev_bytes(t) * shape[a], a) \
            if a in used else mesh.all_reduce(dev_bytes(t), a)
    params = sum(dev_bytes(t) for t in joint.invars if self._is_param(t))
    # the update can shard the optimizer state over the data-parallel axes a
    # parameter is replicated on (reduce-scatter the accumulated gradient,
    # update a shard, all-gather the parameter: the all-reduce's traffic)
    moments = 0.0
    for t in joint.invars:
      if self._is_param(t):
        spec = spec_of.get(t) or ()
        used = {a for dim in spec for a in dim}
        moments += dev_bytes(t) / math.prod(
            shape[a] for a in data_axes - used)
    residual = sum(dev_bytes(t) for t in gb.invars
                   if t in {o for op in gf.ops for o in op.outputs}
                   and not self._is_param(t))
    inputs = sum(dev_bytes(t) for t in acts)
    ls = self.shapes[l]
    d = mesh.num_devices
    fwd = (ls.fwd_flops / d / self.profile.flops_per_s
           + ls.fwd_bytes / d / self.profile.mem_bytes_per_s)
    # the ILP priced the all-reduce per micro-batch; keep at least the
    # compute, the ILP's one-device time split over d (a guard against
    # taking out an all-reduce the ILP did not charge)
    one = sol.objective if d == 1 else \
        self.cost(l, (1, 1), Mode.AUTO).micro_seconds
    micro = max(sol.objective - sync, one / d)
    strategy = "dp axes " + (",".join(map(str, sorted(data_axes))) or "-")
    return LayerCost(micro, sync, fwd, params, moments, residual, inputs,
                     wall, strategy)
