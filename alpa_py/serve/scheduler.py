"""Cluster scheduling policies for multi-LoRA serving: which GPU a new
request goes to. One policy object serves the serving simulator
(``serve.simulator``) and a cluster of engines alike: it sees each GPU as
a ``GpuView`` and returns a GPU id, or None to keep the request queued.

* ``punica``: the GPU with the largest batch that still has a free row and
  KV room (consolidation: few GPUs run full batches, idle ones can be
  released), ties broken by the most free KV pages (Punica, MLSys '24).
* ``round-robin``: the next GPU in turn that has room.
* ``least-loaded``: the GPU with the smallest batch that has room.
* ``one-adapter-per-batch``: a GPU whose batch holds only the request's
  adapter (or nothing), largest first: what a serving system without
  batched LoRA operators can do.
* ``adapter-affinity``: among GPUs with room, those whose adapter cache
  already holds the request's adapter, largest batch first; otherwise the
  least loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class GpuView:
  """What a policy sees of one GPU."""

  gid: int
  batch: int  # requests running
  max_batch: int
  free_pages: int
  batch_adapters: frozenset  # adapters of the running requests
  cached_adapters: frozenset  # adapters resident in the device cache

  def has_room(self, pages: int) -> bool:
    return self.batch < self.max_batch and self.free_pages >= pages


class Policy:
  """Chooses a GPU for a request of ``adapter`` needing ``pages`` KV
  pages now; None keeps it queued."""

  name = "policy"

  def choose(self, adapter: int, pages: int,
             gpus: Sequence[GpuView]) -> int | None:
    raise NotImplementedError

  def reset(self) -> None:
    """Forgets any state (a new run)."""


def _fullest(gpus) -> int | None:
  """The GPU with the largest batch (ties: most free pages, lowest id)."""
  if not gpus:
    return None
  return max(gpus, key=lambda g: (g.batch, g.free_pages, -g.gid)).gid


def _emptiest(gpus) -> int | None:
  """The GPU with the smallest batch (ties: most free pages, lowest id)."""
  if not gpus:
    return None
  return min(gpus, key=lambda g: (g.batch, -g.free_pages, g.gid)).gid


def _with_room(gpus, pages) -> list:
  return [g for g in gpus if g.has_room(pages)]


class Punica(Policy):
  name = "punica"

  def choose(self, adapter, pages, gpus):
    return _fullest(_with_room(gpus, pages))


class RoundRobin(Policy):
  name = "round-robin"

  def __init__(self):
    self._next = 0

  def reset(self):
    self._next = 0

  def choose(self, adapter, pages, gpus):
    n = len(gpus)
    for k in range(n):
      g = gpus[(self._next + k) % n]
      if g.has_room(pages):
        self._next = (self._next + k + 1) % n
        return g.gid
    return None


class LeastLoaded(Policy):
  name = "least-loaded"

  def choose(self, adapter, pages, gpus):
    return _emptiest(_with_room(gpus, pages))


class OneAdapterPerBatch(Policy):
  name = "one-adapter-per-batch"

  def choose(self, adapter, pages, gpus):
    return _fullest([g for g in _with_room(gpus, pages)
                     if g.batch_adapters <= frozenset((adapter,))])


class AdapterAffinity(Policy):
  name = "adapter-affinity"

  def choose(self, adapter, pages, gpus):
    ok = _with_room(gpus, pages)
    warm = [g for g in ok if adapter < 0 or adapter in g.cached_adapters]
    return _fullest(warm) if warm else _emptiest(ok)


POLICIES = {p.name: p for p in (Punica, RoundRobin, LeastLoaded,
                                OneAdapterPerBatch, AdapterAffinity)}


def get_policy(name: str) -> Policy:
  """A fresh policy object by name.

  Raises:
    ValueError: an unknown name (the message lists the choices).
  """
  if name not in POLICIES:
    raise ValueError(f"unknown serving policy {name!r}; choose one of "
                     f"{sorted(POLICIES)}")
  return POLICIES[name]()
