"""A small Griffin-style language model: a recurrent (RG-LRU) block and a
causal attention block, written as Flax users write them.

The RG-LRU is a gated linear recurrence over time,

  h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t),
  a_t = sigmoid(Lambda) ** (c * r_t),

with a learned ``(width,)`` parameter ``Lambda`` and input / recurrence
gates ``i_t``, ``r_t``. ``scan`` picks how the recurrence runs over time:
``jax.lax.associative_scan``, ``jax.lax.scan``, or an unrolled Python loop
(no scan primitive at all). The math is the same in all three.

The model knows nothing about meshes; ``pipeline_boundaries`` only calls
``alpa_py.mark_pipeline_boundary()`` between the two residual blocks.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import alpa_py
from alpa_py.models.gpt import causal_attention, lm_loss

SCANS = ("associative", "lax", "loop")


@dataclasses.dataclass(frozen=True)
class RecurrentConfig:
  """Model shape.

  Attributes:
    vocab_size: tokens in the vocabulary.
    width: model width (and the recurrence's state size).
    num_heads: attention heads (must divide ``width``).
    mlp_ratio: MLP width / width.
    c: the RG-LRU's fixed exponent scale (8 in Griffin).
    scan: how the recurrence runs over time, one of ``SCANS``.
    pipeline_boundaries: mark a pipeline boundary between the recurrent
      and the attention block.
    remat: recompute each residual block in the backward pass
      (``flax.linen.remat``), as long-sequence models usually do.
  """

  vocab_size: int = 128
  width: int = 64
  num_heads: int = 4
  mlp_ratio: int = 2
  c: float = 8.0
  scan: str = "associative"
  pipeline_boundaries: bool = True
  remat: bool = False

  def __post_init__(self):
    if self.scan not in SCANS:
      raise ValueError(f"scan (={self.scan!r}) must be one of {SCANS}")
    if self.width % self.num_heads:
      raise ValueError(f"num_heads (={self.num_heads}) must divide width "
                       f"(={self.width})")


def linear_recurrence(a, b, scan: str):
  """``h_t = a_t * h_{t-1} + b_t`` over axis 1 of ``[batch, time, width]``,
  from ``h_{-1} = 0``."""
  if scan == "associative":
    def combine(left, right):
      a_l, b_l = left
      a_r, b_r = right
      return a_l * a_r, a_r * b_l + b_r
    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return h
  if scan == "lax":
    def step(h, ab):
      a_t, b_t = ab
      h = a_t * h + b_t
      return h, h
    h0 = jnp.zeros((a.shape[0], a.shape[2]), a.dtype)
    _, hs = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1),
                                    jnp.swapaxes(b, 0, 1)))
    return jnp.swapaxes(hs, 0, 1)
  h = jnp.zeros((a.shape[0], a.shape[2]), a.dtype)
  hs = []
  for t in range(a.shape[1]):
    h = a[:, t] * h + b[:, t]
    hs.append(h)
  return jnp.stack(hs, axis=1)


class RGLRU(nn.Module):
  """The real-gated linear recurrent unit."""

  width: int
  c: float
  scan: str

  @nn.compact
  def __call__(self, x):
    # Lambda starts so that a = sigmoid(Lambda) ** c lies in [0.9, 0.999]
    def init_lambda(key, shape):
      a = jax.random.uniform(key, shape, minval=0.9 ** (1 / self.c),
                             maxval=0.999 ** (1 / self.c))
      return jnp.log(a / (1 - a))
    lam = self.param("a_param", init_lambda, (self.width,))
    gate_x = jax.nn.sigmoid(nn.Dense(self.width, name="input_gate")(x))
    gate_a = jax.nn.sigmoid(nn.Dense(self.width, name="a_gate")(x))
    # log a_t = c * r_t * log sigmoid(Lambda), kept in log space for stability
    log_a = -self.c * gate_a * jax.nn.softplus(-lam)
    a = jnp.exp(log_a)
    multiplier = jnp.sqrt(1 - jnp.exp(2 * log_a))
    return linear_recurrence(a, multiplier * (gate_x * x), self.scan)


class RecurrentBlock(nn.Module):
  """Griffin's temporal mixing: a gelu branch times the RG-LRU branch."""

  cfg: RecurrentConfig

  @nn.compact
  def __call__(self, x):
    w = self.cfg.width
    y = nn.gelu(nn.Dense(w, name="gate_branch")(x))
    h = RGLRU(w, self.cfg.c, self.cfg.scan, name="rg_lru")(
        nn.Dense(w, name="rnn_branch")(x))
    return nn.Dense(w, name="out")(h * y)


class AttentionBlock(nn.Module):
  """Causal multi-head self-attention."""

  cfg: RecurrentConfig

  @nn.compact
  def __call__(self, x):
    b, s, w = x.shape
    nh = self.cfg.num_heads
    qkv = nn.Dense(3 * w, name="qkv")(x).reshape(b, s, 3, nh, w // nh)
    q, k, v = (qkv[:, :, i] for i in range(3))
    return nn.Dense(w, name="proj")(causal_attention(q, k, v).reshape(b, s, w))


class MLPBlock(nn.Module):
  cfg: RecurrentConfig

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.cfg.mlp_ratio * self.cfg.width, name="fc1")(x))
    return nn.Dense(self.cfg.width, name="fc2")(y)


class ResidualBlock(nn.Module):
  """Pre-norm residual: temporal mixing (recurrent or attention), then MLP."""

  cfg: RecurrentConfig
  mixing: str  # "recurrent" or "attention"

  @nn.compact
  def __call__(self, x):
    mix = RecurrentBlock if self.mixing == "recurrent" else AttentionBlock
    x = x + mix(self.cfg, name=self.mixing)(nn.LayerNorm()(x))
    return x + MLPBlock(self.cfg, name="mlp")(nn.LayerNorm()(x))


class RecurrentLM(nn.Module):
  """Embedding, a recurrent block, an attention block, tied output layer."""

  cfg: RecurrentConfig

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.cfg.vocab_size, self.cfg.width, name="embed")
    block = nn.remat(ResidualBlock) if self.cfg.remat else ResidualBlock
    x = embed(tokens)
    x = block(self.cfg, "recurrent", name="block_0")(x)
    if self.cfg.pipeline_boundaries:
      alpa_py.mark_pipeline_boundary()
    x = block(self.cfg, "attention", name="block_1")(x)
    return embed.attend(nn.LayerNorm(name="final_norm")(x))


def recurrent_pipeline(scan: str = "associative", batch: int = 8,
                       seq: int = 16, width: int = 64,
                       pipeline_boundaries: bool = True, remat: bool = False):
  """(train state, batch, step) of the recurrent LM; the step takes its
  gradient with ``alpa_py.value_and_grad``, as PipeshardParallel needs."""
  cfg = RecurrentConfig(width=width, scan=scan,
                        pipeline_boundaries=pipeline_boundaries, remat=remat)
  model = RecurrentLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0,
                              cfg.vocab_size)
  params = model.init(jax.random.PRNGKey(0), tokens)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.sgd(0.05, momentum=0.9))

  def loss_of(params, apply_fn, batch):
    return lm_loss(apply_fn(params, batch["tokens"]), batch["tokens"])

  def step(state, batch):
    loss, grads = alpa_py.value_and_grad(loss_of)(state.params,
                                                  state.apply_fn, batch)
    return state.apply_gradients(grads=grads), loss

  return state, {"tokens": tokens}, step
