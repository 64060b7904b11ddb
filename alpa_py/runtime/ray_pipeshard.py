"""A pipelined step on the Ray cluster: each stage on one host.

Every stage's submesh must lie inside one host. Each worker runs the one
pipeline interpreter over the ``PipelineProgram``, for the stages on its
host, once per step (one driver call per worker per step, whatever the number
of micro-batches); tensors crossing hosts go through a mailbox actor in Ray's
object store. A stage-local update runs on each stage's host, and its
results (the new parameters) stay there: the next step's inputs are handles
that only that host holds. A whole-mesh update runs once per step as one
SPMD program over every host's devices, on accumulated values the hosts
exchange through the same mailbox.
"""

from __future__ import annotations

import asyncio
import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils

from alpa_py.compiler.pipeline_program import GLOBAL, PipelineProgram
from alpa_py.runtime.distributed_array import DistributedArray
from alpa_py.runtime.pipeline_interpreter import RunStats
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
    self._num_outputs = len(program.outputs)
    self._key = next(_keys)
    self._mailbox = ray.remote(Mailbox).options(num_cpus=0).remote()
    cluster.extra_actors.append(self._mailbox)
    self._steps = itertools.count()
    self.last_run_stats = RunStats()  # the workers', merged
    cluster.call_all("load_pipeline", self._key, program.portable(), hosts)

  def call_flat(self, leaves) -> list:
    cluster = self._cluster
    args = worker_args(leaves, cluster)
    step = next(self._steps)
    handles = cluster.new_handles(self._num_outputs)
    results = cluster.call_all("run_pipeline", self._key, step, args, handles,
                               self._mailbox)
    self._mailbox.clear.remote(step)
    cluster.remote_calls += 1  # counted like the workers' calls
    stats = RunStats()
    for _, worker_stats in results:
      stats = stats.merged(RunStats(**worker_stats))
    self.last_run_stats = stats
    # each output from the host that holds it (a stage's), or from any
    shapes = [next(r[0][k] for r in results if r[0][k] is not None)
              for k in range(self._num_outputs)]
    return [DistributedArray(cluster, h, shape, dtype)
            for h, (shape, dtype) in zip(handles, shapes)]


class WorkerTransport:
  """Worker side ``Transport``: this host's stages; other hosts' tensors,
  accumulators and step inputs through the mailbox.

  Args:
    program: the portable program.
    hosts: the host of each stage.
    rank: this worker's host.
    loaded: (kind, stage) -> (callable, argument shardings).
    inputs: tensor id -> this host's value of each step input (a jax.Array
      kept on the workers, a host array, or None where another host holds
      it).
    step: the step number (mailbox keys).
    mailbox: the ``Mailbox`` actor.
  """

  block = True

  def __init__(self, program, hosts, rank, loaded, inputs, step, mailbox):
    self._program, self._hosts, self._rank = program, hosts, rank
    self._loaded, self._inputs = loaded, inputs
    self._step, self._mailbox = step, mailbox
    everyone = frozenset(range(max(hosts) + 1)) | {rank}
    readers: dict = {}  # tensor -> hosts whose programs read it
    local_readers: set = set()  # read by a program on one host's devices
    for s, kind, task in program.all_tasks():
      where = everyone if kind == GLOBAL else {hosts[s]}
      for t in task.in_ids:
        readers.setdefault(t, set()).update(where)
        if kind != GLOBAL:
          local_readers.add(t)
    made: dict = {}  # tensor -> host of the program that outputs it
    for s, kind, task in program.all_tasks():
      if kind not in ("R", GLOBAL):
        for t in task.out_ids:
          made.setdefault(t, hosts[s])
    self._remote_read = {t for t, hs in readers.items()
                         if t in made and hs - {made[t]}}
    per_step = sorted(t for t in program.per_step_ids if t in readers)
    # a whole-mesh array (the whole-mesh update's result) a stage reads:
    # every worker gathers the same ones in the same order (SPMD)
    self._full = {}
    for t in per_step:
      v = inputs.get(t)
      if isinstance(v, jax.Array) and not v.is_fully_addressable \
          and t in local_readers:
        self._full[t] = np.asarray(multihost_utils.process_allgather(
            v, tiled=True))
    # an array one host holds (a stage-local update's result), offered to
    # the other hosts that read it
    for t in per_step:
      v = inputs.get(t)
      if isinstance(v, jax.Array) and v.is_fully_addressable \
          and readers[t] - {rank}:
        self._mailbox.put.remote((step, "in", t), np.asarray(v))

  def owns(self, stage):
    return self._hosts[stage] == self._rank

  def program(self, key):
    return self._loaded[key]

  def step_value(self, t):
    if t in self._full:
      return self._full[t]
    v = self._inputs.get(t)
    if v is None:  # held by another host
      import ray
      return ray.get(self._mailbox.get.remote((self._step, "in", t)))
    return v

  def batch_value(self, t):
    return np.asarray(self._inputs[t])

  def place(self, value, sharding):
    if sharding.is_fully_addressable:  # a program on this host's devices
      return jax.device_put(value, sharding)
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      if not value.sharding.is_equivalent_to(sharding, value.ndim):
        value = jax.jit(lambda a: a, out_shardings=sharding)(value)
      return value
    arr = np.asarray(value)
    return jax.make_array_from_callback(arr.shape, sharding,
                                        lambda idx: arr[idx])

  def receive(self, t, m):
    import ray
    return ray.get(self._mailbox.get.remote((self._step, "t", t, m)))

  def send(self, t, m, value):
    if t in self._remote_read:
      self._mailbox.put.remote((self._step, "t", t, m), np.asarray(value))
