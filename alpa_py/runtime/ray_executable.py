"""One SPMD step running on the Ray cluster's host workers.

The driver plans and compiles the step as usual; its ``Task`` is exported
with ``jax.export`` (a serialized artifact, not a pickled jaxpr) and loaded
on every worker; each step is then one call per worker. Inputs are handles of
arrays already on the workers or host arrays sent through Ray's object store;
outputs stay on the workers as ``DistributedArray`` handles.
"""

from __future__ import annotations

import itertools

import numpy as np

from alpa_py.compiler.program import Task
from alpa_py.runtime.distributed_array import DistributedArray

_keys = itertools.count(1)


def worker_args(leaves, cluster) -> list:
  """Step inputs as the workers take them: ("h", handle) for an array
  already on this cluster's workers, ("np", array) for a host array."""
  args = []
  for x in leaves:
    if isinstance(x, DistributedArray):
      if x.live_cluster() is not cluster:
        raise ValueError(f"an input ({x!r}) lives on another Ray cluster than "
                         "the one this step runs on; fetch it with "
                         "np.asarray() and pass the host array")
      args.append(("h", x.handle))
    else:
      args.append(("np", np.asarray(x)))
  return args


class RayStepRunner:
  """Runs one exported SPMD program on every worker."""

  def __init__(self, task: Task, cluster):
    self._cluster = cluster
    self._key = next(_keys)
    self._num_outputs = len(task.out_ids)
    cluster.call_all("load", self._key, task.portable())
    self.calls_per_step = len(cluster.workers)

  def call_flat(self, leaves) -> list:
    cluster = self._cluster
    args = worker_args(leaves, cluster)
    handles = cluster.new_handles(self._num_outputs)
    shapes = cluster.call_all("run", self._key, args, handles)[0]
    return [DistributedArray(cluster, h, shape, dtype)
            for h, (shape, dtype) in zip(handles, shapes)]
