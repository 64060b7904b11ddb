"""The GPT forward for serving: prefill and one-token decode over a paged KV
cache, with each token's LoRA adapter read from the device adapter slots.

The math is ``alpa_py.models.GPT``'s, applied with the same Flax layers to
the same parameters, so an engine's greedy tokens are the full model's.
The LoRA updates go through the batched operators: SGMV over the prompt
segments in prefill, BGMV with one adapter per row in decode.

KV pages: ``k`` and ``v`` are ``[layers, pages + 1, page_size, heads,
head_dim]``; the last page is scratch, written by padded rows.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.kernels import lora as lora_ops
from alpa_py.models.gpt import GPTConfig
from alpa_py.models.lora import LoRADense

LORA_ALPHA = LoRADense.__dataclass_fields__["alpha"].default


@dataclasses.dataclass(frozen=True)
class Layout:
  """What the compiled programs are specialised on (besides shapes)."""

  cfg: GPTConfig
  page_size: int
  lora_backend: str = "auto"


def _p(params):
  return params["params"] if "params" in params else params


def _ln(p, x, dtype):
  return nn.LayerNorm(dtype=dtype).apply({"params": p}, x)


def _embed(cfg: GPTConfig):
  return nn.Embed(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype)


def _lora_dense(lay: Layout, p, slots, kind: str, layer: int, x, lora):
  """Base Dense + the LoRA update of each token's adapter slot.

  ``lora``: ("bgmv", slot ids per row) or ("sgmv", seg_starts, seg_slots).
  """
  cfg = lay.cfg
  a_all, b_all = slots[kind]
  y = nn.Dense(p["base"]["kernel"].shape[-1],
               dtype=cfg.dtype).apply({"params": p["base"]}, x)
  flat = x.reshape(-1, x.shape[-1])
  a = a_all[layer].astype(x.dtype)
  b = b_all[layer].astype(x.dtype)
  scale = jnp.full((a.shape[0],), LORA_ALPHA / cfg.lora_rank)
  if lora[0] == "bgmv":
    upd = lora_ops.bgmv(flat, a, b, lora[1], scale, backend=lay.lora_backend)
  else:
    upd = lora_ops.sgmv(flat, a, b, lora[1], lora[2], scale,
                        backend=lay.lora_backend)
  return y + upd.reshape(y.shape)


def _qkv(lay: Layout, p, slots, i, x, lora):
  """The attention inputs of block ``i`` for ``x[B, S, H]``: q, k and v,
  each ``[B, S, heads, head_dim]``."""
  cfg = lay.cfg
  b, s, h = x.shape
  nh = cfg.num_heads
  y = _ln(p["LayerNorm_0"], x, cfg.dtype)
  qkv = _lora_dense(lay, p["qkv"], slots, "qkv", i, y, lora)
  q, k, v = jnp.split(qkv.reshape(b, s, 3, nh, h // nh), 3, axis=2)
  return tuple(t.squeeze(2) for t in (q, k, v))


def _after_attention(lay: Layout, p, slots, i, x, ctx, lora):
  """The rest of block ``i`` once attention gave ``ctx`` (any shape of
  ``x``'s size)."""
  cfg = lay.cfg
  x = x + _lora_dense(lay, p["proj"], slots, "proj", i,
                      ctx.reshape(x.shape).astype(x.dtype), lora)
  y = _ln(p["LayerNorm_1"], x, cfg.dtype)
  y = _lora_dense(lay, p["fc1"], slots, "fc1", i, y, lora)
  y = nn.gelu(y)
  return x + _lora_dense(lay, p["fc2"], slots, "fc2", i, y, lora)


def _block(lay: Layout, p, slots, i, x, lora, attend):
  """One transformer block on ``x[B, S, H]``; ``attend(q, k, v)`` does the
  attention (and the cache writes) for this layer."""
  q, k, v = _qkv(lay, p, slots, i, x, lora)
  return _after_attention(lay, p, slots, i, x, attend(q, k, v), lora)


def _softmax_attend(scores, mask, v_rows, spec):
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum(spec, jax.nn.softmax(scores, axis=-1), v_rows)


def _sample(logits, temps, seeds, counters):
  """Greedy where ``temps == 0``, else a draw from softmax(logits / t) with
  the key ``fold_in(PRNGKey(seed), counter)`` (batch-independent)."""
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(row, t, seed, c):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), c)
    return jax.random.categorical(key, row / jnp.maximum(t, 1e-6))

  drawn = jax.vmap(draw)(logits, temps, seeds, counters).astype(jnp.int32)
  return jnp.where(temps > 0, drawn, greedy)


def _final(lay: Layout, p, x):
  cfg = lay.cfg
  x = _ln(p["LayerNorm_0"], x, cfg.dtype)
  return _embed(cfg).apply({"params": p["wte"]}, x, method="attend")


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3, 4))
def decode_step(lay: Layout, params, slots, k_pages, v_pages, tokens,
                positions, tables, slot_ids, temps, seeds, counters):
  """One token for each of ``B`` rows: writes its K/V at ``positions`` in
  the pages of ``tables[B, P]`` and attends over positions <= its own.

  Returns (next tokens [B], logits [B, V], k_pages, v_pages)."""
  cfg = lay.cfg
  p = _p(params)
  ps = lay.page_size
  x = _embed(cfg).apply({"params": p["wte"]}, tokens[:, None])
  x = x + p["wpe"][positions][:, None].astype(cfg.dtype)
  rows = jnp.arange(tokens.shape[0])
  page = tables[rows, positions // ps]
  off = positions % ps
  span = tables.shape[1] * ps
  mask = (jnp.arange(span)[None, :] <= positions[:, None])[:, None, :]
  lora = ("bgmv", slot_ids)
  caches = [k_pages, v_pages]
  for i in range(cfg.num_layers):
    def attend(q, k, v, i=i):
      kp = caches[0].at[i, page, off].set(k[:, 0].astype(caches[0].dtype))
      vp = caches[1].at[i, page, off].set(v[:, 0].astype(caches[1].dtype))
      caches[0], caches[1] = kp, vp
      kk = kp[i][tables].reshape(tables.shape[0], span, *k.shape[2:])
      vv = vp[i][tables].reshape(tables.shape[0], span, *v.shape[2:])
      d = q.shape[-1]
      scores = jnp.einsum("bnd,bknd->bnk", q[:, 0], kk.astype(q.dtype)) / \
          jnp.sqrt(d).astype(q.dtype)
      ctx = _softmax_attend(scores, mask, vv.astype(q.dtype), "bnk,bknd->bnd")
      return ctx[:, None]
    x = _block(lay, p[f"block_{i}"], slots, i, x, lora, attend)
  logits = _final(lay, p, x)[:, 0]
  return _sample(logits, temps, seeds, counters), logits, caches[0], caches[1]


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3, 4))
def prefill(lay: Layout, params, slots, k_pages, v_pages, tokens, positions,
            segment, pages, offsets, seg_starts, seg_slots, last, temps,
            seeds, counters):
  """The prompts of ``R`` requests packed in ``T`` tokens (``segment[t]``:
  the request of token t; padding has its own segment): writes every
  token's K/V at (``pages``, ``offsets``), attends causally inside each
  request, and samples one token from each request's ``last`` position.

  Returns (next tokens [R], logits [R, V], k_pages, v_pages)."""
  cfg = lay.cfg
  p = _p(params)
  x = _embed(cfg).apply({"params": p["wte"]}, tokens[None])
  x = x + p["wpe"][positions][None].astype(cfg.dtype)
  mask = ((segment[:, None] == segment[None, :]) &
          (positions[None, :] <= positions[:, None]))[None, None]
  lora = ("sgmv", seg_starts, seg_slots)
  caches = [k_pages, v_pages]
  for i in range(cfg.num_layers):
    def attend(q, k, v, i=i):
      caches[0] = caches[0].at[i, pages, offsets].set(
          k[0].astype(caches[0].dtype))
      caches[1] = caches[1].at[i, pages, offsets].set(
          v[0].astype(caches[1].dtype))
      d = q.shape[-1]
      scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(d).astype(q.dtype)
      return _softmax_attend(scores, mask, v, "bnqk,bknd->bqnd")
    x = _block(lay, p[f"block_{i}"], slots, i, x, lora, attend)
  logits = _final(lay, p, x)[0][last]
  return _sample(logits, temps, seeds, counters), logits, caches[0], caches[1]


def page_bytes(cfg: GPTConfig, page_size: int, dtype) -> int:
  """Device bytes of one KV page (K and V, every layer)."""
  return 2 * cfg.num_layers * page_size * cfg.hidden * jnp.dtype(dtype).itemsize
