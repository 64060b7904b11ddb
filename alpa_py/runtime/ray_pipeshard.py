"""A pipelined step on the Ray cluster: each stage on one host.

Every stage's submesh must lie inside one host. Each worker runs the one
pipeline interpreter over the ``PipelineProgram``, for the stages on its
host, once per step (one driver call per worker per step, whatever the number
of micro-batches); tensors crossing hosts go through a mailbox actor in Ray's
object store. The update runs once per step as one SPMD program over every
host's devices, on accumulated values the hosts exchange through the same
mailbox.
"""

from __future__ import annotations

import asyncio
import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils

from alpa_py.compiler.pipeline_program import PipelineProgram
from alpa_py.runtime.distributed_array import DistributedArray
from alpa_py.runtime.ray_executable import worker_args

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


def stage_hosts(stage_device_ids, devices_per_host: int) -> tuple:
  """The host of each stage (given each stage's device ids); a stage must
  not span hosts."""
  hosts = []
  for k, device_ids in enumerate(stage_device_ids):
    found = {d // devices_per_host for d in device_ids}
    if len(found) != 1:
      raise ValueError(
          f"stage {k} spans devices {list(device_ids)} on hosts "
          f"{sorted(found)}; on Ray each stage must fit in one host of "
          f"{devices_per_host} devices (use submeshes of at most "
          f"{devices_per_host})")
    hosts.append(found.pop())
  return tuple(hosts)


class RayPipelineRunner:
  """Driver side: loads the program on every worker; one call per step."""

  def __init__(self, program: PipelineProgram, cluster):
    import ray
    self._cluster = cluster
    hosts = stage_hosts([st.device_ids for st in program.stages],
                        cluster.devices_per_host)
    self._num_outputs = len(program.update.out_ids)
    self._key = next(_keys)
    self._mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
    cluster.extra_actors.append(self._mailbox)
    self._steps = itertools.count()
    self.last_run_stats = None  # measured on the workers, not reported back
    cluster.call_all("load_pipeline", self._key, program.portable(), hosts)

  def call_flat(self, leaves) -> list:
    cluster = self._cluster
    args = worker_args(leaves, cluster)
    step = next(self._steps)
    handles = cluster.new_handles(self._num_outputs)
    shapes = cluster.call_all("run_pipeline", self._key, step, args, handles,
                              self._mailbox)[0]
    self._mailbox.clear.remote(step)
    cluster.remote_calls += 1  # counted like the workers' calls
    return [DistributedArray(cluster, h, shape, dtype)
            for h, (shape, dtype) in zip(handles, shapes)]


class WorkerTransport:
  """Worker side ``Transport``: this host's stages; other hosts' tensors and
  accumulators through the mailbox.

  Args:
    program: the portable program.
    hosts: the host of each stage.
    rank: this worker's host.
    loaded: ("F"|"B", stage) or "update" -> (callable, argument shardings).
    inputs: tensor id -> this host's value of each step input (a jax.Array
      kept on the workers, or a host array).
    step: the step number (mailbox keys).
    mailbox: the ``Mailbox`` actor.
  """

  block = True

  def __init__(self, program, hosts, rank, loaded, inputs, step, mailbox):
    self._program, self._hosts, self._rank = program, hosts, rank
    self._loaded, self._inputs = loaded, inputs
    self._step, self._mailbox = step, mailbox
    producer = program.producer
    readers: dict = {}
    for st in program.stages:
      for task in (st.forward, st.backward):
        for t in task.in_ids:
          readers.setdefault(t, set()).add(st.index)
    self._remote_read = {t for t, ks in readers.items() if t in producer and any(
        hosts[k] != hosts[producer[t]] for k in ks)}
    # every worker gathers the same per-step values in the same order (SPMD)
    self._full = {}
    for t in sorted(t for t in readers if t in program.per_step_ids):
      v = inputs[t]
      self._full[t] = np.asarray(multihost_utils.process_allgather(
          v, tiled=True)) if isinstance(v, jax.Array) else v

  def owns(self, stage):
    return self._hosts[stage] == self._rank

  def program(self, key):
    return self._loaded[key]

  def step_value(self, t):
    return self._full[t]

  def batch_value(self, t):
    return np.asarray(self._inputs[t])

  def update_value(self, t):
    return self._inputs[t]

  def place(self, value, sharding):
    return jax.device_put(value, sharding)

  def receive(self, t, m):
    import ray
    return ray.get(self._mailbox.get.remote((self._step, "t", t, m)))

  def send(self, t, m, value):
    if t in self._remote_read:
      self._mailbox.put.remote((self._step, "t", t, m), np.asarray(value))

  def accumulated(self, acc):
    import ray
    producer = self._program.producer
    for t in self._program.accumulated:
      if self.owns(producer[t]):
        self._mailbox.put.remote((self._step, "acc", t), np.asarray(acc[t]))
    return {t: np.asarray(acc[t]) if t in acc else
            ray.get(self._mailbox.get.remote((self._step, "acc", t)))
            for t in self._program.accumulated}

  def place_update(self, value, sharding):
    if isinstance(value, jax.Array):
      if not value.sharding.is_equivalent_to(sharding, value.ndim):
        value = jax.jit(lambda a: a, out_shardings=sharding)(value)
      return value
    arr = np.asarray(value)
    return jax.make_array_from_callback(arr.shape, sharding,
                                        lambda idx: arr[idx])
