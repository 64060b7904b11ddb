"""Training steps written the way each library's documentation writes them.

Every entry builds ``(args, step)``: ``step(*args)`` returns the next
``args[:-1]`` (the model state) and the loss. The gradient is taken with
``alpa_py.value_and_grad`` (a drop-in for ``jax.value_and_grad``, which
``PipeshardParallel`` needs to find the gradients); nothing else in a step
knows about alpa_py, and no step marks pipeline boundaries (the pipelined
tests cut layers with ``AutoLayerOption``).

Styles: Flax linen (``TrainState``), Flax NNX (``nnx.split`` / ``merge``),
Haiku (``hk.transform``), Equinox (the module passed whole), a Flax decoder
scanned over its layers with ``nn.scan(nn.remat(Block))``, and a Griffin-style
model with a gated linear recurrence (``recurrent_model``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import alpa_py

BATCH, IN, HIDDEN, OUT = 16, 32, 64, 8


def _regression_batch():
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  return {"x": jax.random.normal(kx, (BATCH, IN)),
          "y": jax.random.normal(ky, (BATCH, OUT))}


def _adam():
  # eps well above float32 rounding of a near-zero gradient: Adam's first
  # step is lr * g / (|g| + eps), which otherwise turns the last bit of a
  # summation order into a different update
  return optax.adam(1e-2, eps=1e-4)


def _optax_step(loss_fn, tx):
  """The optax docs' step: ``(params, opt_state, batch)``."""

  def step(params, opt_state, batch):
    loss, grads = alpa_py.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def flax_linen():
  import flax.linen as nn
  from flax.training import train_state

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x = nn.LayerNorm()(nn.gelu(nn.Dense(HIDDEN)(x)))
      return nn.Dense(OUT)(x)

  batch = _regression_batch()
  model = MLP()
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0),
                                              batch["x"]),
      tx=optax.sgd(0.05, momentum=0.9))

  def loss_fn(params, batch):
    return jnp.mean((model.apply(params, batch["x"]) - batch["y"]) ** 2)

  def step(state, batch):
    loss, grads = alpa_py.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), loss

  return (state, batch), step


def flax_nnx():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
      self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
      self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)
      self.out = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.l1(x))
      x = self.norm(nnx.relu(self.l2(x)))
      return self.out(x)

  graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
  tx = _adam()

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  return (params, tx.init(params), _regression_batch()), _optax_step(loss_fn,
                                                                     tx)


def haiku():
  import haiku as hk

  def forward(x):
    return hk.nets.MLP([HIDDEN, HIDDEN, OUT], activation=jax.nn.gelu)(x)

  net = hk.without_apply_rng(hk.transform(forward))
  batch = _regression_batch()
  params = net.init(jax.random.PRNGKey(0), batch["x"])
  tx = optax.sgd(0.05, momentum=0.9)

  def loss_fn(params, batch):
    return jnp.mean((net.apply(params, batch["x"]) - batch["y"]) ** 2)

  return (params, tx.init(params), batch), _optax_step(loss_fn, tx)


def equinox():
  import equinox as eqx

  model = eqx.nn.MLP(IN, OUT, HIDDEN, depth=2, activation=jax.nn.gelu,
                     key=jax.random.PRNGKey(0))
  tx = _adam()

  def loss_fn(params, static, batch):
    m = eqx.combine(params, static)
    return jnp.mean((jax.vmap(m)(batch["x"]) - batch["y"]) ** 2)

  def step(model, opt_state, batch):
    params, static = eqx.partition(model, eqx.is_array)
    loss, grads = alpa_py.value_and_grad(loss_fn)(params, static, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, loss

  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  return (model, opt_state, _regression_batch()), step


def scanned_decoder(layers: int = 2, unrolled: bool = False):
  """A decoder whose blocks run under ``nn.scan(nn.remat(Block))``, the
  MaxText / levanter way (``unrolled``: the same blocks in a Python loop)."""
  import flax.linen as nn
  from flax.training import train_state
  from alpa_py.models.gpt import causal_attention, lm_loss

  width, heads, vocab, seq = 64, 4, 128, 16

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      b, s, w = x.shape
      h = nn.LayerNorm()(x)
      q, k, v = (nn.Dense(w)(h).reshape(b, s, heads, w // heads)
                 for _ in range(3))
      x = x + nn.Dense(w)(causal_attention(q, k, v).reshape(b, s, w))
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(w)(nn.gelu(nn.Dense(4 * w)(h)))
      return x, None

  class Decoder(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(vocab, width)
      x = embed(tokens)
      if unrolled:
        for _ in range(layers):
          x, _ = Block()(x, None)
      else:
        x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=layers)(
                           name="blocks")(x, None)
      return embed.attend(nn.LayerNorm()(x))

  model = Decoder()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, seq), 0, vocab)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(0), tokens),
      tx=optax.sgd(0.05, momentum=0.9))

  def loss_fn(params, batch):
    return lm_loss(model.apply(params, batch["tokens"]), batch["tokens"])

  def step(state, batch):
    loss, grads = alpa_py.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), loss

  return (state, {"tokens": tokens}), step


def recurrent():
  from recurrent_model import recurrent_pipeline
  state, batch, step = recurrent_pipeline(batch=BATCH,
                                          pipeline_boundaries=False)
  return (state, batch), step


ZOO = {"flax_linen": flax_linen, "flax_nnx": flax_nnx, "haiku": haiku,
       "equinox": equinox, "scanned_decoder": scanned_decoder,
       "recurrent": recurrent}
