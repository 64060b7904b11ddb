"""A GPT-style decoder-only transformer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpa_py.compiler.markers import mark_pipeline_boundary
from alpa_py.models.lora import LoRADense


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Model shape.

  Attributes:
    vocab_size: tokens in the vocabulary.
    seq_len: maximum sequence length.
    hidden: model width.
    num_heads: attention heads (must divide ``hidden``).
    num_layers: transformer blocks.
    mlp_ratio: MLP width / hidden.
    dtype: activation dtype.
    pipeline_boundaries: call ``alpa_py.mark_pipeline_boundary()`` between
      blocks (for ``ManualLayerOption``; no effect on the math).
    lora_adapters: if > 0, the qkv, proj, fc1 and fc2 layers carry that many
      LoRA adapters, and the model takes per-sequence adapter ids.
    lora_rank: rank of each adapter.
  """

  vocab_size: int = 256
  seq_len: int = 32
  hidden: int = 64
  num_heads: int = 4
  num_layers: int = 2
  mlp_ratio: int = 4
  dtype: jnp.dtype = jnp.float32
  pipeline_boundaries: bool = False
  lora_adapters: int = 0
  lora_rank: int = 8

  def __post_init__(self):
    if self.hidden % self.num_heads:
      raise ValueError(f"num_heads (={self.num_heads}) must divide hidden "
                       f"(={self.hidden})")

  def num_params(self) -> int:
    h, v, s, l = self.hidden, self.vocab_size, self.seq_len, self.num_layers
    per_layer = 4 * h * h + 4 * h + 2 * self.mlp_ratio * h * h + \
        (self.mlp_ratio + 1) * h + 4 * h
    return v * h + s * h + l * per_layer + 2 * h

  def flops_per_token(self) -> float:
    """Training FLOPs per token (forward + backward = 3x forward)."""
    h, s, l = self.hidden, self.seq_len, self.num_layers
    fwd = l * (2 * (4 + 2 * self.mlp_ratio) * h * h + 4 * s * h) + \
        2 * h * self.vocab_size
    return 3.0 * fwd


def causal_attention(q, k, v):
  """Softmax attention of ``[b, s, heads, d]`` queries over earlier keys."""
  s, d = q.shape[1], q.shape[-1]
  scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(d).astype(q.dtype)
  mask = jnp.tril(jnp.ones((s, s), bool))
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, axis=-1), v)


def _dense(cfg: GPTConfig, features: int, name: str, ids):
  if cfg.lora_adapters:
    layer = LoRADense(features, cfg.lora_adapters, cfg.lora_rank,
                      dtype=cfg.dtype, name=name)
    return lambda x: layer(x, ids)
  return nn.Dense(features, dtype=cfg.dtype, name=name)


class Block(nn.Module):
  cfg: GPTConfig

  @nn.compact
  def __call__(self, x, ids=None):
    cfg = self.cfg
    b, s, h = x.shape
    nh = cfg.num_heads
    y = nn.LayerNorm(dtype=cfg.dtype)(x)
    qkv = _dense(cfg, 3 * h, "qkv", ids)(y)
    q, k, v = jnp.split(qkv.reshape(b, s, 3, nh, h // nh), 3, axis=2)
    q, k, v = (t.squeeze(2) for t in (q, k, v))  # [b, s, nh, hd]
    ctx = causal_attention(q, k, v).reshape(b, s, h)
    x = x + _dense(cfg, h, "proj", ids)(ctx)
    y = nn.LayerNorm(dtype=cfg.dtype)(x)
    y = _dense(cfg, cfg.mlp_ratio * h, "fc1", ids)(y)
    y = nn.gelu(y)
    return x + _dense(cfg, h, "fc2", ids)(y)


class GPT(nn.Module):
  """Token + position embeddings, blocks, final norm, tied output layer."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, adapter_ids: jax.Array | None = None
               ) -> jax.Array:
    """Logits; ``adapter_ids[batch]`` (or per token) picks LoRA adapters."""
    cfg = self.cfg
    ids = None
    if cfg.lora_adapters:
      if adapter_ids is None:
        raise ValueError("a GPT with lora_adapters needs adapter_ids")
      ids = jnp.broadcast_to(jnp.asarray(adapter_ids).reshape(
          tokens.shape[0], -1), tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden, dtype=cfg.dtype, name="wte")
    pos = self.param("wpe", nn.initializers.normal(0.02),
                     (cfg.seq_len, cfg.hidden))
    x = embed(tokens) + pos[None, :tokens.shape[1]].astype(cfg.dtype)
    for i in range(cfg.num_layers):
      if cfg.pipeline_boundaries and i > 0:
        mark_pipeline_boundary()
      x = Block(cfg, name=f"block_{i}")(x, ids)
    x = nn.LayerNorm(dtype=cfg.dtype)(x)
    return embed.attend(x)


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Next-token cross-entropy, averaged."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  target = tokens[:, 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  return nll.mean()
