"""A Ray cluster of host workers, and distributed arrays held on them.

``init(cluster="ray")`` attaches to a running cluster (``address="auto"`` or
an address) or starts a local one (``address=None``), starts one
``HostWorker`` actor per host (on distinct Ray nodes where there are enough,
else side by side on one node, as simulated hosts), and joins them into one
``jax.distributed`` group. The driver plans and exports programs; workers run
them, one call per worker per step.
"""

from __future__ import annotations

import itertools
import os
import socket

import jax
import numpy as np

from alpa_py.compiler.pipeline_program import PipelineProgram
from alpa_py.compiler.program import Task
from alpa_py.runtime.backend import next_serial
from alpa_py.runtime.ray_executable import RayStepRunner
from alpa_py.runtime.ray_pipeshard import RayPipelineRunner, stage_hosts
from alpa_py.runtime.worker import HostWorker

_handles = itertools.count(1)


def _reachable(address: str, timeout: float = 3.0) -> None:
  host, _, port = address.rpartition(":")
  if not port.isdigit():
    raise ValueError(f"address (={address!r}) must look like host:port or "
                     "'auto'")
  try:
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout):
      pass
  except OSError as e:
    raise ConnectionError(
        f"cannot reach a Ray cluster at {address!r} ({e}); start one with "
        "`ray start --head` and pass its address, or address=None to start a "
        "local cluster") from None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class RayCluster:
  """The Ray backend: host workers in a Ray cluster (``kind == "ray"``)."""

  kind = "ray"

  def __init__(self, address=None, num_nodes=None, num_devices_per_node=None):
    import ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    self.started_ray = False
    if address is None:
      if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 num_cpus=max(os.cpu_count() or 2, (num_nodes or 1) + 1))
        self.started_ray = True
    else:
      if address != "auto":
        _reachable(address)
      ray.init(address=address, include_dashboard=False, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(min((n["Resources"].get("GPU", 0) for n in nodes), default=0))
    cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
    platform = "gpu" if gpus else "cpu"
    hosts = num_nodes or len(nodes)
    if platform == "cpu" and hosts > cpus:
      raise ValueError(f"asked for {hosts} hosts (num_nodes) but the Ray "
                       f"cluster has {cpus} CPUs; each host worker needs one")
    per_host = num_devices_per_node or (gpus if gpus else 4)
    if gpus and per_host > gpus:
      raise ValueError(f"asked for {per_host} devices per node but the Ray "
                       f"nodes have {gpus} GPUs each")
    if gpus and hosts > len(nodes):
      raise ValueError(f"asked for {hosts} GPU hosts but the Ray cluster has "
                       f"{len(nodes)} nodes")
    self.platform = platform
    self.num_hosts = hosts
    self.devices_per_host = per_host
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    actor = ray.remote(num_cpus=1, num_gpus=per_host if gpus else 0)(HostWorker)
    coordinator = f"{nodes[0]['NodeManagerAddress']}:{_free_port()}" \
        if len(nodes) > 1 else f"127.0.0.1:{_free_port()}"
    self.workers = []
    for rank in range(hosts):
      opts = {}
      if len(nodes) >= hosts:
        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            nodes[rank]["NodeID"], soft=False)
      self.workers.append(actor.options(**opts).remote(
          rank, hosts, coordinator, per_host, platform))
    infos = ray.get([w.info.remote() for w in self.workers], timeout=120)
    self.num_devices = infos[0]["devices"]
    self.remote_calls = 0
    self.extra_actors = []  # e.g. pipeline mailboxes, killed at shutdown
    # Stand-ins on the driver for planning and export: the driver needs as
    # many local devices as the cluster has (simulated CPU devices do).
    local = jax.devices()
    if len(local) < self.num_devices:
      raise ValueError(
          f"the driver sees {len(local)} devices but the cluster has "
          f"{self.num_devices}; the driver exports programs for the whole "
          "mesh, so give it as many (e.g. XLA_FLAGS=--xla_force_host_platform_"
          f"device_count={self.num_devices})")
    self.devices = tuple(local[:self.num_devices])
    self.serial = next_serial()

  @property
  def alive(self) -> bool:
    return bool(self.workers)

  # -- the backend protocol --------------------------------------------------

  def step_runner(self, task: Task) -> RayStepRunner:
    return RayStepRunner(task, self)

  def check_stage_placement(self, stage_device_ids) -> None:
    stage_hosts(stage_device_ids, self.devices_per_host)

  def pipeline_runner(self, program: PipelineProgram) -> RayPipelineRunner:
    return RayPipelineRunner(program, self)

  # -- used by executables ---------------------------------------------------

  def call_all(self, method: str, *args, timeout: float = 300.0):
    """Calls a method on every worker; fails fast if one dies."""
    import ray
    self.remote_calls += len(self.workers)
    refs = [getattr(w, method).remote(*args) for w in self.workers]
    pending = list(refs)
    try:
      while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
        if not done:
          raise TimeoutError(f"workers did not answer `{method}` within "
                             f"{timeout:.0f} s")
        ray.get(done)  # raises at once if that worker died
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
            TimeoutError) as e:
      lines = [l.strip() for l in str(e).splitlines() if l.strip() and
               "internal frames" not in l]
      errs = [l for l in lines if "Error" in l.split(":")[0]]
      cause = (errs[-1] if errs else lines[-1] if lines else "")[:400]
      raise RuntimeError(
          f"a worker of the Ray cluster failed during `{method}` "
          f"({type(e).__name__}: {cause}); the cluster "
          "is unusable: call alpa_py.shutdown() and alpa_py.init() again, then "
          "restore the last checkpoint") from None
    return ray.get(refs)

  def new_handles(self, n: int) -> list[int]:
    return [next(_handles) for _ in range(n)]

  def free(self, handles) -> None:
    if not self.workers:
      return
    for w in self.workers:
      try:
        w.free.remote(list(handles))
      except Exception:  # noqa: BLE001 - shutting down; nothing to free
        pass

  def fetch(self, handle, shape, dtype) -> np.ndarray:
    out = np.empty(shape, dtype)
    for shards in self.call_all("fetch", handle):
      for index, data in shards:
        out[tuple(slice(a, b) for a, b in index)] = data
    return out

  def shutdown(self) -> None:
    import ray
    for w in self.workers + self.extra_actors:
      try:
        ray.kill(w)
      except Exception:  # noqa: BLE001 - already dead
        pass
    self.workers = []
    self.extra_actors = []
    if self.started_ray and ray.is_initialized():
      ray.shutdown()
