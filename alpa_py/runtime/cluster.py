"""``init()`` / ``shutdown()``: which backend steps run on.

The local backend uses the devices of this process (``jax.devices()``, e.g.
8 simulated CPU devices); ``parallelize`` without ``init`` uses it. The Ray
backend (``runtime/ray_cluster.py``) runs steps on host worker actors. The
current backend lives in one scoped handle, ``_SESSION``; nothing else in
the package keeps cluster state.
"""

from __future__ import annotations

from alpa_py.runtime.backend import Backend, LocalBackend

_SUPPORTED = ("local", "ray")


class _Session:
  """The backend ``init`` attached, and the default local one."""

  def __init__(self):
    self.current: Backend | None = None
    self._default_local: LocalBackend | None = None

  def default_local(self) -> LocalBackend:
    # one stable object, so that it can be part of executable cache keys
    if self._default_local is None:
      self._default_local = LocalBackend()
    return self._default_local


_SESSION = _Session()


def init(cluster: str = "local", address: str | None = None,
         num_nodes: int | None = None,
         num_devices_per_node: int | None = None) -> Backend:
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
    The backend.

  Raises:
    ValueError: an unknown cluster kind, options the kind does not take, or
      more hosts/devices than the cluster has.
    RuntimeError: ``init`` was already called without ``shutdown``.
    ConnectionError: a Ray address that cannot be reached.
  """
  if cluster not in _SUPPORTED:
    raise ValueError(f"cluster (={cluster!r}) is not available; this version "
                     f"supports {_SUPPORTED}")
  if _SESSION.current is not None:
    raise RuntimeError(
        f"alpa_py.init was already called (cluster={_SESSION.current.kind!r});"
        " call alpa_py.shutdown() first, then init again")
  if cluster == "local":
    if address is not None or num_nodes is not None or num_devices_per_node:
      raise ValueError("cluster='local' takes no address/num_nodes/"
                       "num_devices_per_node")
    _SESSION.current = LocalBackend()
    return _SESSION.current
  # Ray is optional and slow to import.
  from alpa_py.runtime.ray_cluster import RayCluster
  _SESSION.current = RayCluster(address=address, num_nodes=num_nodes,
                                num_devices_per_node=num_devices_per_node)
  return _SESSION.current


def shutdown() -> None:
  """Releases the backend: every worker actor it made, and the Ray cluster
  if ``init`` started it (a cluster it attached to keeps running).
  Executables compiled for it, and arrays it holds, refuse to run after."""
  current, _SESSION.current = _SESSION.current, None
  if current is not None:
    current.shutdown()


def current_cluster() -> Backend:
  """The backend from ``init``, or the local devices."""
  return _SESSION.current or _SESSION.default_local()
