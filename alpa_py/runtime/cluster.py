"""``init()`` / ``shutdown()`` and the devices plans run on.

The local backend uses the devices of this process (``jax.devices()``, e.g.
8 simulated CPU devices); ``parallelize`` without ``init`` uses it. The Ray
backend (``runtime/ray_cluster.py``) runs steps on host worker actors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

_SUPPORTED = ("local", "ray")


@dataclasses.dataclass(frozen=True)
class DeviceCluster:
  """The devices a plan may use."""

  kind: str
  devices: tuple[Any, ...]

  @property
  def num_devices(self) -> int:
    return len(self.devices)


_current: DeviceCluster | None = None


def init(cluster: str = "local", address: str | None = None,
         num_nodes: int | None = None,
         num_devices_per_node: int | None = None):
  """Attaches alpa_py to a cluster.

  Args:
    cluster: ``"local"`` (the devices of this process) or ``"ray"``.
    address: Ray only: ``None`` starts a local Ray cluster; ``"auto"`` or
      ``"host:port"`` attaches to a running one (``ray start --head``).
    num_nodes: Ray only: hosts to use (default: every alive Ray node; on one
      machine, more than one means simulated hosts).
    num_devices_per_node: Ray only: GPUs per host (default: all), or the
      number of simulated CPU devices per host (default 4).

  Returns:
    The cluster.

  Raises:
    ValueError: an unknown cluster kind, options the kind does not take, or
      more hosts/devices than the cluster has.
    ConnectionError: a Ray address that cannot be reached.
  """
  global _current
  if cluster not in _SUPPORTED:
    raise ValueError(f"cluster (={cluster!r}) is not available; this version "
                     f"supports {_SUPPORTED}")
  shutdown()
  if cluster == "local":
    if address is not None or num_nodes is not None or num_devices_per_node:
      raise ValueError("cluster='local' takes no address/num_nodes/"
                       "num_devices_per_node")
    _current = DeviceCluster("local", tuple(jax.devices()))
    return _current
  from alpa_py.runtime.ray_cluster import RayCluster
  _current = RayCluster(address=address, num_nodes=num_nodes,
                        num_devices_per_node=num_devices_per_node)
  return _current


def shutdown() -> None:
  """Releases the cluster: every worker actor it made, and the Ray cluster
  if ``init`` started it (a cluster it attached to keeps running)."""
  global _current
  if _current is not None and getattr(_current, "kind", "local") == "ray":
    _current.shutdown()
  _current = None


_default_local: DeviceCluster | None = None


def current_cluster() -> DeviceCluster:
  """The cluster from ``init``, or the local devices (one stable object, so
  that it can be part of executable cache keys)."""
  global _default_local
  if _current is not None:
    return _current
  if _default_local is None:
    _default_local = DeviceCluster("local", tuple(jax.devices()))
  return _default_local
