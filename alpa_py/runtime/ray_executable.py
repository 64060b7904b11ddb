"""A ShardParallel step running on the Ray cluster's host workers.

The driver plans and lowers the step as usual, exports it with
``jax.export`` (a serialized artifact, not a pickled jaxpr), and loads it on
every worker; each step is then one call per worker. Inputs are handles of
arrays already on the workers or host arrays sent through Ray's object store;
outputs stay on the workers as ``DistributedArray`` handles.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np

from alpa_py.runtime.ray_cluster import DistributedArray, RayCluster

_keys = itertools.count(1)


class RayExecutable:
  """An ``Executable`` whose step runs on the workers.

  Attributes:
    plan, mesh, solve_stats: as the local ``Executable``'s.
  """

  def __init__(self, local_ex, cluster: RayCluster):
    self._local = local_ex
    self._cluster = cluster
    self.plan = local_ex.plan
    self.mesh = local_ex.mesh
    self.solve_stats = local_ex.solve_stats
    self.in_shardings = local_ex.in_shardings
    exported = jax.export.export(local_ex.jitted)(*local_ex.lowered_args)
    self._key = next(_keys)
    self._in_specs = [s.spec for s in local_ex.in_shardings]
    cluster.call_all("load", self._key, exported.serialize(),
                     tuple(local_ex.plan.mesh_shape), self._in_specs,
                     local_ex.out_specs)
    self._out_tree = local_ex._out_tree
    self.calls_per_step = len(cluster.workers)

  def call_flat(self, leaves):
    args = []
    for x in leaves:
      if isinstance(x, DistributedArray):
        if x._cluster() is not self._cluster:
          raise ValueError("an input lives on a Ray cluster that was shut down;"
                           " restore it from a checkpoint and pass host arrays")
        args.append(("h", x.handle))
      else:
        args.append(("np", np.asarray(x)))
    n_out = self._out_tree.num_leaves
    handles = self._cluster.new_handles(n_out)
    shapes = self._cluster.call_all("run", self._key, args, handles)[0]
    outs = [DistributedArray(self._cluster, h, shape, dtype)
            for h, (shape, dtype) in zip(handles, shapes)]
    return jax.tree_util.tree_unflatten(self._out_tree, outs)

  def hlo_text(self) -> str:
    return self._local.hlo_text()

  def memory_per_device(self) -> int:
    return self._local.memory_per_device()

  def __repr__(self):
    return (f"<alpa_py.RayExecutable mesh={self.plan.mesh_shape} on "
            f"{len(self._cluster.workers)} hosts>")
