"""The engine's decode with approximate attention over long contexts
(``serve.Engine(..., attention="kernel_sum")``).

Each sequence keeps, per layer and head, a :class:`~alpa_py.sketch.
KVAttention` over its keys and values (built from the prefilled pages
when the sequence is admitted, one insert per decoded token). A decode
step runs the model layer by layer: the device computes each layer's q, k
and v for the batch, the host inserts k and v into the rows' structures
and answers every row's and head's query from them (exact for short
contexts, heavy buckets exactly and the rest sampled for long ones), and
the device carries on with the block's projection and MLP. The split
costs a device-host round trip per layer; it is the design of serving
systems that keep long KV caches in host memory and sample attention
there (MagicPIG, 2024, does this with LSH sampling), and it pays where a
context is long enough that the exact sum dominates a step.

The decoded tokens' keys and values live in the host structures only (the
device pages keep the prompt's, written by prefill, and are not read by
this decode); a preempted sequence drops its structures and builds them
again when it is prefilled again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.serve import decoder
from alpa_py.sketch.attention import KVAttention

ATTENTION = ("exact", "kernel_sum")
DEFAULT_EPS = 0.05


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(lay, params, tokens, positions):
  cfg = lay.cfg
  p = decoder._p(params)
  x = decoder._embed(cfg).apply({"params": p["wte"]}, tokens[:, None])
  return x + p["wpe"][positions][:, None].astype(cfg.dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _layer_qkv(lay, params, slots, i, x, slot_ids):
  q, k, v = decoder._qkv(lay, decoder._p(params)[f"block_{i}"], slots, i,
                         x, ("bgmv", slot_ids))
  return q[:, 0], k[:, 0], v[:, 0]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _layer_out(lay, params, slots, i, x, ctx, slot_ids):
  return decoder._after_attention(lay, decoder._p(params)[f"block_{i}"],
                                  slots, i, x, ctx, ("bgmv", slot_ids))


@functools.partial(jax.jit, static_argnums=(0,))
def _head(lay, params, x, temps, seeds, counters):
  logits = decoder._final(lay, decoder._p(params), x)[:, 0]
  return decoder._sample(logits, temps, seeds, counters), logits


class SketchedKV:
  """The host structures of every running sequence, and the decode that
  reads them. ``options`` go to each :class:`KVAttention` (``eps``,
  ``delta``, ``exact_below``, ...); ``eps`` defaults to ``DEFAULT_EPS``
  here, tighter than the structure's own 0.1: every layer's and head's
  errors reach the logits, and a random-initialised tiny model's top two
  logits are often within 0.05 of each other."""

  def __init__(self, cfg, options: dict | None = None):
    self.cfg = cfg
    self.head_dim = cfg.hidden // cfg.num_heads
    options = dict(options or {})
    fixed = sorted(set(options) & {"dim", "value_dim", "scale"})
    if fixed:
      raise ValueError(f"attention_options sets {fixed}: the model fixes "
                       "the head dimension and the score scale")
    self.options = {"eps": DEFAULT_EPS, **options}
    self._seed = self.options.pop("seed", None)
    if self._seed is not None and (not isinstance(self._seed, int)
                                   or self._seed < 0):
      raise ValueError(f"attention_options seed (={self._seed!r}) must be "
                       "an int >= 0 or None")
    try:
      KVAttention(self.head_dim, **self.options)
    except (TypeError, ValueError) as e:
      raise ValueError(f"attention_options (={options!r}): {e}") from None
    self._sets: dict[int, list[list[KVAttention]]] = {}
    self.evaluations = 0  # key evaluations of every decode query
    self.keys = 0  # the keys exact attention would have read for them
    self.sampled = 0  # queries answered from draws (not exactly)

  def build(self, rid: int, k, v) -> None:
    """Structures for ``rid`` from its context's keys and values
    ``[layers, tokens, heads, head_dim]``."""
    k = np.asarray(k, np.float32)
    v = np.asarray(v, np.float32)
    sets = []
    for i in range(self.cfg.num_layers):
      row = []
      for h in range(self.cfg.num_heads):
        # a seed of its own per sequence, layer and head (None: the OS's)
        seed = None if self._seed is None else [self._seed, rid, i, h]
        s = KVAttention(self.head_dim, seed=seed, **self.options)
        s.insert(k[i, :, h], v[i, :, h])
        row.append(s)
      sets.append(row)
    self._sets[rid] = sets

  def drop(self, rid: int) -> None:
    self._sets.pop(rid, None)

  def _attend(self, rid, i, q, k, v):
    out = np.empty_like(q)
    for h, s in enumerate(self._sets[rid][i]):
      s.insert(k[h], v[h])
      out[h] = s.attend(q[h])[0]
      self.evaluations += s.last_evaluations
      self.sampled += s.last_sampled
      self.keys += len(s)
    return out

  def decode(self, engine, rids, tokens, positions, slot_ids, temps, seeds,
             counters):
    """One token for each of ``rids`` (rows past ``len(rids)`` are
    padding); returns (next tokens, logits) as device arrays."""
    lay, params, slots = engine.layout, engine.params, engine.adapters.slots
    x = _embed(lay, params, tokens, positions)
    for i in range(self.cfg.num_layers):
      q, k, v = (np.asarray(t, np.float32) for t in
                 _layer_qkv(lay, params, slots, i, x, slot_ids))
      ctx = np.zeros_like(q)
      for r, rid in enumerate(rids):
        ctx[r] = self._attend(rid, i, q[r], k[r], v[r])
      x = _layer_out(lay, params, slots, i, x,
                     jnp.asarray(ctx, self.cfg.dtype), slot_ids)
    return _head(lay, params, x, temps, seeds, counters)


def context_kv(k_pages, v_pages, table, n: int, page_size: int):
  """The first ``n`` tokens' keys and values of a sequence whose pages are
  ``table``, from the device pages: two ``[layers, n, heads, head_dim]``
  host arrays."""
  pages = -(-n // page_size)
  idx = np.asarray(table[:pages], np.int32)
  out = []
  for pool in (k_pages, v_pages):
    kv = np.asarray(pool[:, idx], np.float32)  # [L, P, ps, H, hd]
    out.append(kv.reshape(kv.shape[0], -1, *kv.shape[3:])[:, :n])
  return out
