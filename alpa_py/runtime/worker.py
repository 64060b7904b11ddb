"""The Ray actor that runs on each host: buffers, executables, steps.

All workers of a cluster join one ``jax.distributed`` group (CPU: gloo
collectives; GPU: NCCL), so a sharded program spans every host's devices.
Programs arrive as ``jax.export`` artifacts (bytes), never as pickled
jaxprs; arrays stay here, named by handles, until fetched or freed.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from alpa_py.compiler.program import make_mesh
from alpa_py.runtime import pipeline_interpreter
from alpa_py.runtime.ray_pipeshard import WorkerTransport


class HostWorker:
  """One per host. Methods are called through Ray."""

  def __init__(self, rank: int, num_hosts: int, coordinator: str,
               devices_per_host: int, platform: str):
    # JAX reads these when its backend starts (the first device query
    # below), not at import.
    if platform == "cpu":
      os.environ["XLA_FLAGS"] = (
          f"--xla_force_host_platform_device_count={devices_per_host}")
      os.environ["JAX_PLATFORMS"] = "cpu"
    if platform == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_hosts, process_id=rank)
    self.rank = rank
    self.buffers: dict = {}
    self.programs: dict = {}
    self.pipelines: dict = {}

  def info(self):
    return dict(rank=jax.process_index(), devices=jax.device_count(),
                local_devices=jax.local_device_count(),
                platform=jax.devices()[0].platform)

  def ping(self):
    return self.rank

  def _load_task(self, task, device_ids=None):
    """(callable, argument shardings) of a portable ``Task``: on this host's
    devices for a pipeline stage (those of ``device_ids``, the stage's
    cluster-wide ids), on every host's for a global program."""
    exported = jax.export.deserialize(task.blob)
    devs = jax.local_devices() if task.local_devices else jax.devices()
    if task.local_devices and device_ids is not None:
      devs = [devs[d % len(devs)] for d in device_ids]
    mesh = make_mesh(devs[:int(np.prod(task.mesh_shape))], task.mesh_shape)
    ins = tuple(NamedSharding(mesh, s) for s in task.in_specs)
    outs = tuple(NamedSharding(mesh, s) for s in task.out_specs)
    return jax.jit(exported.call, in_shardings=ins, out_shardings=outs), ins

  def _inputs(self, args, shardings=None):
    """Step inputs from ("h", handle) / ("np", array) pairs; with
    ``shardings``, each placed in its argument's layout."""
    vals = []
    for i, (kind, val) in enumerate(args):
      v = self.buffers[val] if kind == "h" else np.asarray(val)
      if shardings is not None:
        sharding = shardings[i]
        if isinstance(v, jax.Array):
          if not v.sharding.is_equivalent_to(sharding, v.ndim):
            # e.g. last step's new state in the layout the plan gave its
            # outputs; every worker runs the same reshard (SPMD)
            v = jax.jit(lambda x: x, out_shardings=sharding)(v)
        else:
          v = jax.make_array_from_callback(v.shape, sharding,
                                           lambda idx, a=v: a[idx])
      vals.append(v)
    return vals

  def _keep(self, outs, out_handles):
    jax.block_until_ready(outs)
    for h, v in zip(out_handles, outs):
      self.buffers[h] = v
    return [(tuple(v.shape), str(v.dtype)) for v in outs]

  def load(self, key, task):
    """Loads an exported SPMD step for the global mesh."""
    self.programs[key] = self._load_task(task)
    return True

  def run(self, key, args, out_handles):
    """Runs a step on handles / host arrays; keeps the results here."""
    fn, ins = self.programs[key]
    return self._keep(fn(*self._inputs(args, ins)), out_handles)

  def load_pipeline(self, key, program, hosts):
    """Loads a portable ``PipelineProgram``: the programs of the stages on
    this host on their devices, a whole-mesh update on the global mesh."""
    loaded = {}
    for s, kind, task in program.all_tasks():
      if s < 0:
        loaded[(kind, s)] = self._load_task(task)
      elif hosts[s] == self.rank:
        loaded[(kind, s)] = self._load_task(task,
                                            program.stages[s].device_ids)
    self.pipelines[key] = (program, hosts, loaded)
    return True

  def run_pipeline(self, key, step, args, out_handles, mailbox):
    """One pipelined step: this host's stages and their updates (or the
    global update). Returns (per output, (shape, dtype) where this host
    holds it, else None; this host's ``RunStats`` fields)."""
    program, hosts, loaded = self.pipelines[key]
    # a handle another host holds (a stage-local result) reads as None
    vals = [self.buffers.get(val) if kind == "h" else np.asarray(val)
            for kind, val in args]
    inputs = dict(zip(program.invar_ids, vals))
    transport = WorkerTransport(program, hosts, self.rank, loaded, inputs,
                                step, mailbox)
    outs, stats = pipeline_interpreter.interpret(program, transport)
    held = [(h, v) for h, v in zip(out_handles, outs) if v is not None]
    jax.block_until_ready([v for _, v in held])
    for h, v in held:
      self.buffers[h] = v
    shapes = [None if v is None else (tuple(v.shape), str(v.dtype))
              for v in outs]
    return shapes, dataclasses.asdict(stats)

  def fetch(self, handle):
    """This host's shards of a buffer: [(index, ndarray)]."""
    arr = self.buffers.get(handle)
    if arr is None:  # another host holds it (a stage's result)
      return []
    out = []
    for shard in arr.addressable_shards:
      out.append((tuple((s.start, s.stop) for s in _norm(shard.index, arr.shape)),
                  np.asarray(shard.data)))
    return out

  def free(self, handles):
    for h in handles:
      self.buffers.pop(h, None)
    return len(self.buffers)


def _norm(index, shape):
  out = []
  for sl, n in zip(index, shape):
    start, stop, _ = sl.indices(n)
    out.append(slice(start, stop))
  return out
