"""``DistributedArray``: a step result that stays on a Ray cluster's workers.

It is an ordinary class (a pytree leaf); the driver recognises it with
``isinstance``. It holds its cluster weakly: once the cluster is shut down,
reading it raises an error that says so instead of hanging on dead actors.
"""

from __future__ import annotations

import weakref

import numpy as np


class ClusterGoneError(RuntimeError):
  """The Ray cluster that held a value or ran a step was shut down."""


class DistributedArray:
  """A result that stays on the workers until fetched.

  ``np.asarray(x)`` or ``x.fetch()`` brings it to the driver; passing it to
  the next step keeps it where it is. Freed on the workers when the driver
  drops its last reference.
  """

  def __init__(self, cluster, handle: int, shape, dtype):
    self._cluster = weakref.ref(cluster)
    self.handle = handle
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  def live_cluster(self):
    """The cluster holding this array; ``ClusterGoneError`` if shut down."""
    cluster = self._cluster()
    if cluster is None or not cluster.alive:
      raise ClusterGoneError(
          f"{self!r} lived on a Ray cluster that was shut down "
          "(alpa_py.shutdown()); its value is gone. Restore the state from "
          "your last checkpoint and pass host arrays.")
    return cluster

  def fetch(self) -> np.ndarray:
    return self.live_cluster().fetch(self.handle, self.shape, self.dtype)

  def __array__(self, dtype=None, copy=None):
    arr = self.fetch()
    return arr if dtype is None else arr.astype(dtype)

  def block_until_ready(self):
    return self

  def __float__(self):
    return float(self.fetch())

  def __repr__(self):
    return (f"DistributedArray(shape={self.shape}, dtype={self.dtype}, "
            f"handle={self.handle})")

  def __del__(self):
    cluster = self._cluster()
    if cluster is not None and cluster.alive:
      cluster.free([self.handle])
