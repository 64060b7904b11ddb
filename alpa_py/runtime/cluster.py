"""``init()`` / ``shutdown()`` and the devices plans run on.

Only the local backend exists so far: the devices of this process
(``jax.devices()``, e.g. 8 simulated CPU devices). ``parallelize`` without
``init`` uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

_SUPPORTED = ("local",)


@dataclasses.dataclass(frozen=True)
class DeviceCluster:
  """The devices a plan may use."""

  kind: str
  devices: tuple[Any, ...]

  @property
  def num_devices(self) -> int:
    return len(self.devices)


_current: DeviceCluster | None = None


def init(cluster: str = "local", **kwargs) -> DeviceCluster:
  """Attaches alpa_py to a cluster.

  Args:
    cluster: ``"local"``: the devices of this process.

  Returns:
    The cluster.

  Raises:
    ValueError: an unknown or not yet available cluster kind, or options the
      kind does not take.
  """
  global _current
  if cluster not in _SUPPORTED:
    raise ValueError(f"cluster (={cluster!r}) is not available; this version "
                     f"supports {_SUPPORTED}")
  if kwargs:
    raise ValueError(f"cluster='local' takes no options, got {sorted(kwargs)}")
  _current = DeviceCluster("local", tuple(jax.devices()))
  return _current


def shutdown() -> None:
  """Detaches from the cluster (the local backend holds nothing to release)."""
  global _current
  _current = None


def current_cluster() -> DeviceCluster:
  """The cluster from ``init``, or the local devices."""
  return _current if _current is not None else DeviceCluster(
      "local", tuple(jax.devices()))
