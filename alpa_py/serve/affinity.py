"""Routing requests that name no adapter to one by embedding affinity.

A request with ``adapter=-1`` and an ``embedding`` (a representation of
what it asks, e.g. of its prompt) is routed to the adapter whose embedding
has the largest inner product with it among the adapters with room: each
adapter serves at most ``capacity`` such requests at a time (its batch
slots), and a slot is released when the request finishes. That is online
bipartite b-matching with inner-product weights (:mod:`alpa_py.matching`):
greedy or the primal-dual price rule, weights exact or through the
sublinear ``ClusteredMIPS`` index (thousands of adapters, as S-LoRA
serves, make the linear scan per request the cost). A request no adapter
can take (all full, or no positive affinity) runs on the base model.

``Router(engines, adapter_routing=AdapterRouting(...))`` and
``simulate(..., adapter_routing=...)`` use the same object.
"""

from __future__ import annotations

import numpy as np

from alpa_py.matching.online import check_capacities
from alpa_py.matching.weights import ClusteredMIPS, ExactWeights

ALGORITHMS = ("greedy", "primal_dual")


class AdapterRouting:
  """Online assignment of unnamed requests to adapters.

  Args:
    adapter_embeddings: ``[num_adapters, d]``.
    capacity: concurrent routed requests per adapter (int or one per
      adapter).
    algorithm: ``"greedy"`` (largest affinity with room) or
      ``"primal_dual"`` (largest affinity less the adapter's price, which
      rises as it fills and falls back as slots are released).
    weights: ``"exact"`` or ``"mips"`` (``ClusteredMIPS`` with ``probe``).
    candidates: adapters looked at per request.
  """

  def __init__(self, adapter_embeddings, capacity, *,
               algorithm: str = "greedy", weights: str = "exact",
               probe: int = 2, candidates: int = 8):
    if algorithm not in ALGORITHMS:
      raise ValueError(f"algorithm (={algorithm!r}) must be one of "
                       f"{ALGORITHMS}")
    if weights == "exact":
      self.index = ExactWeights(adapter_embeddings)
    elif weights == "mips":
      self.index = ClusteredMIPS(adapter_embeddings, probe=probe)
    else:
      raise ValueError(f"weights (={weights!r}) must be 'exact' or 'mips'")
    n = self.index.num_items
    self.capacity = check_capacities(capacity, n)
    self.load = np.zeros(n, np.int64)
    self.price = np.zeros(n)
    self.algorithm = algorithm
    self.candidates = int(candidates)
    self.routed = 0
    self.unrouted = 0

  @property
  def num_adapters(self) -> int:
    return self.index.num_items

  def route(self, embedding) -> int:
    """The adapter for a request with this embedding (a slot is taken),
    or -1 (the base model)."""
    x = np.asarray(embedding, np.float32)
    if x.shape != (self.index.dim,):
      raise ValueError(f"a request embedding has shape {tuple(x.shape)}; "
                       f"the adapters' embeddings have dimension "
                       f"{self.index.dim}")
    ids, w = self.index.top(x, self.candidates)
    if len(ids) == 0:
      self.unrouted += 1
      return -1
    gain = w - self.price[ids] if self.algorithm == "primal_dual" else w
    k = int(np.argmax(gain))
    if gain[k] <= 0:
      self.unrouted += 1
      return -1
    j = int(ids[k])
    self.load[j] += 1
    self.routed += 1
    if self.algorithm == "primal_dual":
      c = self.capacity[j]
      e_c = (1.0 + 1.0 / c) ** c
      self.price[j] = self.price[j] * (1 + 1.0 / c) + w[k] / ((e_c - 1) * c)
    if self.load[j] == self.capacity[j]:
      self.index.close(j)
    return j

  def release(self, adapter: int) -> None:
    """A routed request on ``adapter`` finished: its slot is free again."""
    if not 0 <= adapter < self.num_adapters or self.load[adapter] == 0:
      raise ValueError(f"release of adapter {adapter}, which holds no "
                       "routed request")
    if self.load[adapter] == self.capacity[adapter]:
      self.index.reopen(adapter)
    self.load[adapter] -= 1
    if self.algorithm == "primal_dual":
      # the price falls back as the adapter empties (the inverse update)
      c = self.capacity[adapter]
      self.price[adapter] = self.price[adapter] / (1 + 1.0 / c)
