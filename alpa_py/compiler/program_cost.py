"""The cost model's price of a *compiled* program: its optimized HLO as XLA
wrote it (after SPMD partitioning and fusion), not the graph the ILP priced.

The ILP prices ops one at a time on the traced graph; XLA then fuses
elementwise chains, merges collectives and adds its own. Pricing the
compiled program under the same profile tells what the plan costs as it
will run:

* a calibrated profile (``CostProfile.model``): its linear model over the
  program's features (``cost_features``), compute scaled by the model's
  contention for the program's device count;
* a rate profile: matmul FLOPs at ``flops_per_s``, convolution FLOPs at
  ``conv_flops_per_s``, the other kernels' bytes at ``mem_bytes_per_s``,
  and every collective by the alpha-beta ring formulas ``LogicalMesh``
  uses, on the intra-node link where its group fits in a node and the
  inter-node link otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alpa_py.compiler.cluster_env import CostProfile
from alpa_py.compiler.cost_features import (INDEX, group_members,
                                            num_partitions, program_features,
                                            ring_bytes, ring_steps)
from alpa_py.compiler.cost_model import COMPUTE_FEATURES
from alpa_py.compiler.hlo_kernels import kernel_stats
from alpa_py.compiler.hlo_stats import collectives

_KERNEL_FEATURES = [INDEX[f] for f in ("fixed",) + COMPUTE_FEATURES]


@dataclasses.dataclass(frozen=True)
class ProgramCost:
  """Predicted seconds of one compiled step, per device.

  Attributes:
    seconds: the total.
    compute: kernels (matmuls, convolutions, the rest, launches, fixed).
    communication: collectives.
  """

  seconds: float
  compute: float
  communication: float


def price_program(hlo_text: str, profile: CostProfile) -> ProgramCost:
  """The profile's price of a compiled program (see the module doc)."""
  n_dev = num_partitions(hlo_text)
  model = profile.model
  if model is not None:
    row = program_features(hlo_text)
    kernels = np.zeros_like(row)
    kernels[_KERNEL_FEATURES] = row[_KERNEL_FEATURES]
    total = float(model.predict(row, n_dev))
    compute = float(model.predict(kernels, n_dev))
    return ProgramCost(total, compute, total - compute)
  ks = kernel_stats(hlo_text)
  compute = (ks.matmul_flops / profile.flops_per_s
             + ks.conv_flops / (profile.conv_flops_per_s or profile.flops_per_s)
             + ks.nonmatmul_bytes / profile.mem_bytes_per_s)
  communication = 0.0
  for c in collectives(hlo_text):
    group = group_members(c.replica_groups, n_dev)[0]
    n = len(group)
    if n <= 1:
      continue
    span = max(group) - min(group) + 1
    inter = span > profile.devices_per_node
    alpha = profile.inter_alpha if inter else profile.intra_alpha
    beta = profile.inter_beta if inter else profile.intra_beta
    for kind, nbytes in c.kind_bytes:
      communication += (alpha * ring_steps(kind, n)
                        + beta * ring_bytes(kind, n, nbytes))
  return ProgramCost(compute + communication, compute, communication)
