"""A PipeshardParallel step on the Ray cluster: each stage on one host.

Every stage's submesh must lie inside one host. Each worker runs, for the
whole step, the instructions of the stages on its host (one driver call per
worker per step, whatever the number of micro-batches); tensors crossing
hosts go through a mailbox actor in Ray's object store. The update runs once
per step as one SPMD program over every host's devices, on accumulated
values the hosts exchange through the same mailbox.
"""

from __future__ import annotations

import asyncio
import itertools

import jax
import numpy as np

from alpa_py.runtime.pipeshard import Instr
from alpa_py.runtime.ray_cluster import DistributedArray, RayCluster

_keys = itertools.count(1000)


class Mailbox:
  """Async actor: ``put(key, value)``; ``get(key)`` waits until it is there."""

  def __init__(self):
    self.box: dict = {}
    self.events: dict = {}

  async def put(self, key, value):
    self.box[key] = value
    self.events.setdefault(key, asyncio.Event()).set()

  async def get(self, key):
    await self.events.setdefault(key, asyncio.Event()).wait()
    return self.box[key]

  async def clear(self, step):
    for key in [k for k in self.box if k[0] == step]:
      self.box.pop(key, None)
      self.events.pop(key, None)


def _program(task, mesh_shape, local: bool):
  exported = jax.export.export(task.jitted)(*task.sds)
  return dict(blob=exported.serialize(), mesh_shape=tuple(mesh_shape),
              local=local, in_specs=[s.spec for s in task.in_shardings],
              out_specs=[s.spec for s in task.out_shardings],
              in_ids=task.in_ids, out_ids=task.out_ids)


class RayPipeshardExecutable:
  """A pipelined step whose stages run on the hosts' workers."""

  def __init__(self, local_ex, cluster: RayCluster):
    import ray
    self._local = local_ex
    self._cluster = cluster
    self.plan = local_ex.plan
    per_host = cluster.devices_per_host
    stage_host = []
    for st in local_ex.plan.stages:
      hosts = {d // per_host for d in st.device_ids}
      if len(hosts) != 1:
        raise ValueError(
            f"stage {st.index} spans devices {list(st.device_ids)} on hosts "
            f"{sorted(hosts)}; on Ray each stage must fit in one host of "
            f"{per_host} devices (use submeshes of at most {per_host})")
      stage_host.append(hosts.pop())
    programs = {}
    for k, st in enumerate(local_ex._stages):
      for kind in ("F", "B"):
        programs[(kind, k)] = _program(st[kind], local_ex.plan.stages[k].logical_shape,
                                       True)
    programs["apply"] = _program(local_ex._apply,
                                 local_ex.plan.update_plan.mesh_shape, False)
    producer = {}
    readers: dict = {}
    for k, st in enumerate(local_ex._stages):
      for kind in ("F", "B"):
        for t in st[kind].out_ids:
          producer[t] = k
        for t in st[kind].in_ids:
          readers.setdefault(t, set()).add(k)
    remote_read = {t for t, ks in readers.items() if t in producer and any(
        stage_host[k] != stage_host[producer[t]] for k in ks)}
    per_step = sorted({t for st in local_ex._stages for kind in ("F", "B")
                       for t in st[kind].in_ids
                       if t in set(local_ex._invar_ids)} - set(local_ex._batch_ids))
    marked = sorted(t for t in local_ex._apply.in_ids if t in producer)
    self._key = next(_keys)
    self._mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
    cluster.extra_actors.append(self._mailbox)
    self._steps = itertools.count()
    payload = dict(programs=programs, instructions=local_ex.instructions,
                   stage_host=stage_host, producer=producer,
                   remote_read=remote_read, per_step=per_step, marked=marked,
                   invar_ids=local_ex._invar_ids,
                   batch_ids=sorted(local_ex._batch_ids),
                   num_micro_batches=local_ex._n)
    cluster.call_all("load_pipeline", self._key, payload)
    self._out_tree = local_ex._out_tree

  def call_flat(self, leaves):
    args = []
    for x in leaves:
      if isinstance(x, DistributedArray):
        args.append(("h", x.handle))
      else:
        args.append(("np", np.asarray(x)))
    step = next(self._steps)
    handles = self._cluster.new_handles(self._out_tree.num_leaves)
    shapes = self._cluster.call_all("run_pipeline", self._key, step, args,
                                    handles, self._mailbox)[0]
    self._mailbox.clear.remote(step)
    self._cluster.remote_calls += 1  # counted like the workers' calls
    outs = [DistributedArray(self._cluster, h, shape, dtype)
            for h, (shape, dtype) in zip(handles, shapes)]
    return jax.tree_util.tree_unflatten(self._out_tree, outs)

  def memory_per_device(self):
    return self._local.memory_per_device()

  def hlo_text(self):
    return self._local.hlo_text()


def run_pipeline_on_worker(worker, key, step, args, out_handles, mailbox):
  """The worker side (called from ``HostWorker.run_pipeline``)."""
  import ray
  from jax.experimental import multihost_utils
  P = worker.pipelines[key]
  me = worker.rank
  n = P["num_micro_batches"]
  host_vals = {}
  for t, (kind, val) in zip(P["invar_ids"], args):
    host_vals[t] = worker.buffers[val] if kind == "h" else np.asarray(val)
  # every worker gathers the same per-step values in the same order (SPMD)
  full = {}
  for t in P["per_step"]:
    v = host_vals[t]
    full[t] = np.asarray(multihost_utils.process_allgather(v, tiled=True)) \
        if isinstance(v, jax.Array) else v
  progs = P["loaded"]
  store, moved, acc, last = {}, {}, {}, {}
  for ins in P["instructions"]:
    s, task, m, t = ins.stage, ins.task, ins.micro_batch, ins.tensor
    if P["stage_host"][s] != me:
      continue
    fn, ins_sh, in_ids, out_ids = progs[(task, s)]
    if ins.kind is Instr.RECV:
      shd = ins_sh[in_ids.index(t)]
      if m is None:
        src = full[t]
      elif t in P["batch_ids"]:
        x = np.asarray(host_vals[t])
        src = x.reshape((x.shape[0] // n, n) + x.shape[1:])[:, m] if n > 1 else x
      elif P["stage_host"][P["producer"][t]] == me:
        src = store[(t, m)]
      else:
        src = ray.get(mailbox.get.remote((step, "t", t, m)))
      moved[(t, m, task)] = jax.device_put(src, shd)
    elif ins.kind is Instr.RUN:
      vals = [moved[(x, m, task)] if (x, m, task) in moved else moved[(x, None, task)]
              for x in in_ids]
      outs = fn(*vals)
      jax.block_until_ready(outs)
      last = dict(zip(out_ids, outs))
      for x, v in last.items():
        store[(x, m)] = v
        if x in P["remote_read"]:
          mailbox.put.remote((step, "t", x, m), np.asarray(v))
    elif ins.kind is Instr.ACC:
      acc[t] = last[t] if t not in acc else acc[t] + last[t]
    else:
      store.pop((t, m), None)
      for k in [k for k in moved if k[0] == t and k[1] == m]:
        del moved[k]
  # exchange accumulated values, then the update as one global program
  for t in P["marked"]:
    if P["stage_host"][P["producer"][t]] == me:
      mailbox.put.remote((step, "acc", t), np.asarray(acc[t]))
  fn, ins_sh, in_ids, out_ids = progs["apply"]
  vals = []
  for t, shd in zip(in_ids, ins_sh):
    if t in P["marked"]:
      v = np.asarray(acc[t]) if t in acc else ray.get(
          mailbox.get.remote((step, "acc", t)))
    else:
      v = host_vals[t]
    if isinstance(v, jax.Array):
      if not v.sharding.is_equivalent_to(shd, v.ndim):
        v = jax.jit(lambda a: a, out_shardings=shd)(v)
    else:
      arr = np.asarray(v)
      v = jax.make_array_from_callback(arr.shape, shd, lambda idx, a=arr: a[idx])
    vals.append(v)
  outs = fn(*vals)
  jax.block_until_ready(outs)
  for h, v in zip(out_handles, outs):
    worker.buffers[h] = v
  return [(tuple(v.shape), str(v.dtype)) for v in outs]
