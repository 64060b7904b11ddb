"""The Ray actor that runs on each host: buffers, executables, steps.

All workers of a cluster join one ``jax.distributed`` group (CPU: gloo
collectives; GPU: NCCL), so a sharded program spans every host's devices.
Programs arrive as ``jax.export`` artifacts (bytes), never as pickled
jaxprs; arrays stay here, named by handles, until fetched or freed.
"""

from __future__ import annotations

import os


class HostWorker:
  """One per host. Methods are called through Ray."""

  def __init__(self, rank: int, num_hosts: int, coordinator: str,
               devices_per_host: int, platform: str):
    if platform == "cpu":
      os.environ["XLA_FLAGS"] = (
          f"--xla_force_host_platform_device_count={devices_per_host}")
      os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if platform == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_hosts, process_id=rank)
    self.rank = rank
    self.buffers: dict = {}
    self.programs: dict = {}

  def info(self):
    import jax
    return dict(rank=jax.process_index(), devices=jax.device_count(),
                local_devices=jax.local_device_count(),
                platform=jax.devices()[0].platform)

  def ping(self):
    return self.rank

  def load(self, key, blob: bytes, mesh_shape, in_specs, out_specs):
    """Deserializes an exported program for the global mesh."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    exported = jax.export.deserialize(blob)
    names = ("x", "y")[:len(mesh_shape)]
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), names,
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    ins = tuple(NamedSharding(mesh, s) for s in in_specs)
    outs = tuple(NamedSharding(mesh, s) for s in out_specs)
    self.programs[key] = (jax.jit(exported.call, in_shardings=ins,
                                  out_shardings=outs), ins)
    return True

  def run(self, key, args, out_handles):
    """Runs a program on handles / host arrays; keeps the results here."""
    import jax
    import numpy as np
    fn, ins = self.programs[key]
    vals = []
    for (kind, val), sharding in zip(args, ins):
      if kind == "h":
        arr = self.buffers[val]
        if not arr.sharding.is_equivalent_to(sharding, arr.ndim):
          # e.g. last step's new state in the layout the plan gave its
          # outputs; every worker runs the same reshard (SPMD)
          arr = jax.jit(lambda x: x, out_shardings=sharding)(arr)
        vals.append(arr)
      else:
        arr = np.asarray(val)
        vals.append(jax.make_array_from_callback(arr.shape, sharding,
                                                 lambda idx, a=arr: a[idx]))
    outs = fn(*vals)
    jax.block_until_ready(outs)
    for h, v in zip(out_handles, outs):
      self.buffers[h] = v
    return [(tuple(v.shape), str(v.dtype)) for v in outs]

  def load_pipeline(self, key, payload):
    """Deserializes a pipeline's stage programs (local meshes) and update
    (the global mesh)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    loaded = {}
    for name, prog in payload["programs"].items():
      exported = jax.export.deserialize(prog["blob"])
      shape = prog["mesh_shape"]
      names = ("x", "y")[:len(shape)]
      devs = jax.local_devices() if prog["local"] else jax.devices()
      mesh = Mesh(np.array(devs[:int(np.prod(shape))]).reshape(shape), names,
                  axis_types=(jax.sharding.AxisType.Auto,) * len(names))
      ins = tuple(NamedSharding(mesh, s) for s in prog["in_specs"])
      outs = tuple(NamedSharding(mesh, s) for s in prog["out_specs"])
      fn = jax.jit(exported.call, in_shardings=ins, out_shardings=outs)
      loaded[name] = (fn, ins, list(prog["in_ids"]), list(prog["out_ids"]))
    payload = dict(payload, loaded=loaded)
    if not hasattr(self, "pipelines"):
      self.pipelines = {}
    self.pipelines[key] = payload
    return True

  def run_pipeline(self, key, step, args, out_handles, mailbox):
    from alpa_py.runtime.ray_pipeshard import run_pipeline_on_worker
    return run_pipeline_on_worker(self, key, step, args, out_handles, mailbox)

  def fetch(self, handle):
    """This host's shards of a buffer: [(index, ndarray)]."""
    import numpy as np
    arr = self.buffers[handle]
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
