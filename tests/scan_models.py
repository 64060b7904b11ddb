"""A small decoder written the MaxText way, scanned or unrolled.

``nn.scan(nn.remat(Block), variable_axes={'params': 0}, ...)`` stacks every
layer's parameters along a leading ``layers`` axis and runs the layers as
one ``scan``; ``scanned=False`` builds the same layers with a Python loop.
Both start from the same parameter values (``unstack_params`` converts the
scanned tree into the unrolled one), so their steps compute the same thing.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  layers: int = 4
  hidden: int = 256
  heads: int = 4
  mlp: int = 1024
  seq: int = 64
  batch: int = 8
  vocab: int = 512


class Block(nn.Module):
  """Pre-norm attention + MLP; returns ``(x, None)`` so that it scans."""

  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, _):
    cfg = self.cfg
    b, s, h = x.shape
    d = h // cfg.heads
    y = nn.LayerNorm(use_bias=False, name="ln1")(x)
    qkv = nn.Dense(3 * h, use_bias=False, name="qkv")(y)
    q, k, v = jnp.split(qkv.reshape(b, s, 3, cfg.heads, d), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d).astype(x.dtype)
    mask = jnp.tril(jnp.ones((s, s), bool))
    logits = jnp.where(mask, logits, -1e9)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)
    x = x + nn.Dense(h, use_bias=False, name="out")(att.reshape(b, s, h))
    y = nn.LayerNorm(use_bias=False, name="ln2")(x)
    y = nn.Dense(cfg.mlp, use_bias=False, name="up")(y)
    x = x + nn.Dense(h, use_bias=False, name="down")(nn.gelu(y))
    return x, None


class Decoder(nn.Module):
  cfg: DecoderConfig
  scanned: bool = True

  @nn.compact
  def __call__(self, tokens):
    cfg = self.cfg
    x = nn.Embed(cfg.vocab, cfg.hidden, name="embed")(tokens)
    if self.scanned:
      stack = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                      split_rngs={"params": True}, length=cfg.layers)
      x, _ = stack(cfg, name="layers")(x, None)
    else:
      for i in range(cfg.layers):
        x, _ = nn.remat(Block)(cfg, name=f"layer_{i}")(x, None)
    x = nn.LayerNorm(use_bias=False, name="ln_f")(x)
    return nn.Dense(cfg.vocab, use_bias=False, name="head")(x)


def unstack_params(params, layers: int):
  """The scanned decoder's params as the unrolled decoder's."""
  p = dict(params["params"])
  stacked = p.pop("layers")
  for i in range(layers):
    p[f"layer_{i}"] = jax.tree_util.tree_map(lambda a: a[i], stacked)
  return {"params": p}


def loss_fn(params, model, tokens):
  logits = model.apply(params, tokens)
  targets = jnp.roll(tokens, -1, axis=1)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def decoder_setup(cfg: DecoderConfig = DecoderConfig(), scanned: bool = True,
                  tx=None):
  """(state, tokens, step): a ``TrainState`` (SGD with momentum by default),
  a batch of tokens, and ``step(state, tokens) -> (state, loss)``. The
  unrolled decoder starts from the scanned decoder's values."""
  tokens = jax.random.randint(jax.random.PRNGKey(1), (cfg.batch, cfg.seq), 0,
                              cfg.vocab)
  params = Decoder(cfg, True).init(jax.random.PRNGKey(0), tokens)
  if not scanned:
    params = unstack_params(params, cfg.layers)
  model = Decoder(cfg, scanned)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=tx or optax.sgd(0.1, momentum=0.9))

  def step(state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, model, tokens)
    return state.apply_gradients(grads=grads), loss

  return state, tokens, step
