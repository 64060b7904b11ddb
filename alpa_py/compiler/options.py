"""Options of the intra-operator pass: one frozen, validated value that the
method carries, the cache key includes, and the pass reads directly."""

from __future__ import annotations

import dataclasses

from alpa_py.compiler.cluster_env import PROFILE_NAMES, CostProfile


@dataclasses.dataclass(frozen=True)
class AutoShardingOption:
  """Options of the intra-operator pass (part of the executable cache key).

  Attributes:
    memory_budget_per_device: bytes one device may hold at the step's peak
      (None: no limit).
    force_data_parallel: fix inputs to data-parallel layouts (batch split on
      dim 0, everything else replicated).
    allow_all_gather: allow resharding by all-gather (else heavily priced).
    allow_all_to_all: allow resharding by all-to-all (else heavily priced).
    prefer_reduce_scatter: offer only reduce-scatter where a partial sum can
      be either all-reduced or reduce-scattered.
    allow_mixed_mesh_shape: also split a dim over both mesh axes in the
      order (1, 0).
    solver_time_limit_s: wall-clock limit of one ILP solve.
    cost_profile: ``"cpu"`` (measured here), a GPU-cluster preset name,
      ``"cpu:calibrated"`` (a cost model calibrated here on first use, then
      cached), or a ``CostProfile`` such as ``alpa_py.calibrate()`` returns.
    force_batch_dim_to_mesh_dim: keep the batch dim of every op that has one
      split over this mesh axis (Alpa's option; the constrained methods set
      it to their data axis). None: the ILP decides.
    allow_recompute_heavy_op: let a dot / convolution run unsplit over some
      devices (recomputed there). False, as in Alpa: each heavy op takes a
      strategy that splits its work over as many devices as any of its
      strategies can.
    force_zero_stage_3_all_gather_threshold: Zero3Parallel keeps parameters
      (and their optimizer state) smaller than this many bytes replicated
      instead of sharding them and gathering them at each use (0: shard
      every one that divides).
    tie_repeated_layers: find alike nodes of repeated layers in the ILP
      (colour refinement, ``ilp_symmetry``) and give each such group one
      strategy, so that the solve grows linearly in the number of layers;
      the full ILP is solved where there is no repetition (or the tied one
      has no plan). False: always the full ILP.
    fusion_aware_bytes: price non-matmul ops by the bytes they move once
      XLA has fused them with their neighbours (``compiler.fusion``), not
      by every byte each reads and writes. Off by default: it lowers the
      price of elementwise work so much that the ILP then keeps residual
      adds replicated on 2-D meshes (gathers the plan prices as one
      all-gather and XLA runs as two); on until that is priced right.
    select_by_compiled_cost: after the ILP, also compile the ILP with the
      batch kept on mesh axis 0 (pinned op by op, and with only the inputs
      and outputs pinned, on the ILP's three cheapest meshes), its
      runner-up for the heaviest arrays (also with the lighter ones
      replicated), tensor-parallel layouts and the
      same pass with fewer choices (the data-parallel, ZeRO-2 and ZeRO-3
      layouts; ``compiled_selection``), price every compiled
      program under the cost profile (``program_cost.price_program``: the
      program as XLA fused it, with the copies around its collectives) and
      keep the cheapest. The ILP prices a graph XLA then rewrites; this
      compares what will run. Costs one XLA compile per candidate. None:
      on when the profile is a calibrated model (its price of a compiled
      program is the one that was fitted to measurements), off otherwise.
      Only for ``ShardParallel`` with the ILP choosing the input layouts and
      no ``mesh_shape`` or ``mesh_link_costs`` given.
    measure_candidates: with the compiled-cost selection on, time this many
      of the cheapest-priced candidates on the devices with the call's own
      arguments (copies: the caller's arrays are neither donated nor
      changed; one warm-up step, then the median of 5 interleaved rounds
      in shuffled order; those within 10% of the fastest are timed again
      over 10 rounds among themselves) and keep the fastest measured. A
      price's error (about 20-30% on the calibrated CPU model) exceeds the
      gap between near-tied plans; a measurement does not. 0: choose by
      price alone. None: every compiled candidate (they are compiled
      already; timing costs 6 steps each, 17 for a near-tie). A call with
      abstract arguments (``get_executable`` on ``ShapeDtypeStruct``s) or a
      non-local backend chooses by price.
  """

  memory_budget_per_device: float | None = None
  force_data_parallel: bool = False
  allow_all_gather: bool = True
  allow_all_to_all: bool = True
  prefer_reduce_scatter: bool = False
  allow_mixed_mesh_shape: bool = False
  solver_time_limit_s: float = 60
  cost_profile: str | CostProfile = "cpu"
  force_batch_dim_to_mesh_dim: int | None = None
  allow_recompute_heavy_op: bool = False
  force_zero_stage_3_all_gather_threshold: int = 0
  tie_repeated_layers: bool = True
  fusion_aware_bytes: bool = False
  select_by_compiled_cost: bool | None = None
  measure_candidates: int | None = None

  def __post_init__(self):
    b = self.memory_budget_per_device
    if b is not None and not (isinstance(b, (int, float)) and b > 0):
      raise ValueError(f"memory_budget_per_device (={b!r}) must be a positive "
                       "number of bytes or None")
    for name in ("force_data_parallel", "allow_all_gather", "allow_all_to_all",
                 "prefer_reduce_scatter", "allow_mixed_mesh_shape",
                 "allow_recompute_heavy_op", "tie_repeated_layers",
                 "fusion_aware_bytes"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"AutoShardingOption.{name} (={getattr(self, name)!r}) "
                        "must be a bool")
    if self.select_by_compiled_cost not in (None, True, False):
      raise TypeError("AutoShardingOption.select_by_compiled_cost "
                      f"(={self.select_by_compiled_cost!r}) must be a bool or "
                      "None (on for a calibrated cost profile)")
    m = self.measure_candidates
    if m is not None and (not isinstance(m, int) or isinstance(m, bool)
                          or m < 0):
      raise ValueError(f"AutoShardingOption.measure_candidates (={m!r}) must "
                       "be an int >= 0 (0: choose by price alone) or None")
    t = self.solver_time_limit_s
    if not (isinstance(t, (int, float)) and t > 0):
      raise ValueError(f"solver_time_limit_s (={t!r}) must be positive")
    k = self.force_batch_dim_to_mesh_dim
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)
                          or k not in (0, 1)):
      raise ValueError(f"force_batch_dim_to_mesh_dim (={k!r}) must be a mesh "
                       "axis (0 or 1) or None")
    g = self.force_zero_stage_3_all_gather_threshold
    if not isinstance(g, int) or isinstance(g, bool) or g < 0:
      raise ValueError("force_zero_stage_3_all_gather_threshold "
                       f"(={g!r}) must be a non-negative number of bytes")
    if not isinstance(self.cost_profile, CostProfile) and \
        self.cost_profile not in PROFILE_NAMES:
      raise ValueError(f"cost_profile (={self.cost_profile!r}) must be one of "
                       f"{PROFILE_NAMES} or a CostProfile (alpa_py.calibrate())")
