"""Adapter residency: every adapter's LoRA weights in host memory, a
bounded set of them in device slots, least recently used evicted first.

The decode and prefill programs read adapters by *slot* (``A[L, S, H, r]``
per LoRA layer kind), so loading one adapter writes one slot in place and
no program is recompiled; a batch holds at most ``capacity`` distinct
adapters, and only the adapters it lacks are loaded.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

LORA_KINDS = ("qkv", "proj", "fc1", "fc2")


def host_adapters(params, num_layers: int) -> dict:
  """Kind -> (A ``[L, N, H_in, r]``, B ``[L, N, r, H_out]``) numpy arrays
  gathered from a LoRA GPT's parameters."""
  p = params["params"] if "params" in params else params
  out = {}
  for kind in LORA_KINDS:
    a = [np.asarray(p[f"block_{i}"][kind]["lora_A"]) for i in range(num_layers)]
    b = [np.asarray(p[f"block_{i}"][kind]["lora_B"]) for i in range(num_layers)]
    out[kind] = (np.stack(a), np.stack(b))
  return out


@functools.partial(jax.jit, donate_argnums=(0,))
def _write_slot(slots, host, slot):
  """Writes one adapter's weights (``host``: kind -> (A[L, H, r],
  B[L, r, O])) into ``slot`` of the device arrays, in place."""
  return {k: (a.at[:, slot].set(host[k][0].astype(a.dtype)),
              b.at[:, slot].set(host[k][1].astype(b.dtype)))
          for k, (a, b) in slots.items()}


class AdapterCache:
  """``capacity`` device slots over ``num_adapters`` host adapters."""

  def __init__(self, host: dict, capacity: int, dtype, device=None):
    n = next(iter(host.values()))[0].shape[1]
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"adapter_cache (={capacity!r}) must be an int > 0 "
                       "(device slots for adapters)")
    self.num_adapters = n
    self.capacity = min(capacity, n) if n else 1
    self.host = host
    put = (lambda x: jax.device_put(x, device)) if device is not None \
        else jnp.asarray
    self.slots = {k: (put(np.zeros((a.shape[0], self.capacity) + a.shape[2:],
                                   dtype)),
                      put(np.zeros((b.shape[0], self.capacity) + b.shape[2:],
                                   dtype)))
                  for k, (a, b) in host.items()}
    self._where: collections.OrderedDict[int, int] = collections.OrderedDict()
    self._free = list(range(self.capacity - 1, -1, -1))
    self.loads = 0
    self.evictions = 0

  def resident(self, adapter: int) -> bool:
    return adapter < 0 or adapter in self._where

  def cached(self) -> list[int]:
    """The adapters resident now."""
    return list(self._where)

  def slot(self, adapter: int) -> int:
    """The slot of a resident adapter (-1 for the base model)."""
    if adapter < 0:
      return -1
    self._where.move_to_end(adapter)
    return self._where[adapter]

  def can_admit(self, adapter: int, in_use: set) -> bool:
    """Whether ``adapter`` is resident or can be loaded without evicting an
    adapter in ``in_use`` (the running batch's)."""
    if self.resident(adapter) or self._free:
      return True
    return any(a not in in_use for a in self._where)

  def ensure(self, adapter: int, in_use: set) -> int:
    """Makes ``adapter`` resident (evicting the least recently used adapter
    not in ``in_use`` if no slot is free); returns its slot.

    Raises:
      RuntimeError: every slot holds an adapter in use (``can_admit``).
    """
    if self.resident(adapter):
      return self.slot(adapter)
    if self._free:
      slot = self._free.pop()
    else:
      victim = next((a for a in self._where if a not in in_use), None)
      if victim is None:
        raise RuntimeError(f"all {self.capacity} adapter slots are in use; "
                           f"adapter {adapter} cannot be loaded now")
      slot = self._where.pop(victim)
      self.evictions += 1
    one = {k: (a[:, adapter], b[:, adapter]) for k, (a, b) in self.host.items()}
    self.slots = _write_slot(self.slots, one, jnp.int32(slot))
    self._where[adapter] = slot
    self.loads += 1
    return slot
