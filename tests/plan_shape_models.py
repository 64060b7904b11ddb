"""Training steps for the plan-shape tests: an MLP, a BERT-style encoder
layer, an MoE layer and a small conv net, each with SGD + momentum (so that
ZeRO has optimizer state to shard)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from alpa_py.models import ConvNet, MLP, MoELayer


class EncoderLayer(nn.Module):
  """Post-LN BERT layer: self-attention (no mask) + a GELU MLP."""

  hidden: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, s, h = x.shape
    d = h // self.heads
    # separate query / key / value projections, as in BERT
    q, k, v = (nn.Dense(h, name=n)(x).reshape(b, s, self.heads, d)
               for n in ("query", "key", "value"))
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / jnp.sqrt(d)
    att = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, -1), v)
    x = nn.LayerNorm()(x + nn.Dense(h, name="proj")(att.reshape(b, s, h)))
    y = nn.Dense(h, name="fc2")(nn.gelu(nn.Dense(4 * h, name="fc1")(x)))
    return nn.LayerNorm()(x + y)


class MoEBlock(nn.Module):
  """A residual top-2 MoE layer dispatching within groups of tokens
  (GShard), one group per sequence."""

  hidden: int
  experts: int
  group: int

  @nn.compact
  def __call__(self, x):
    return x + MoELayer(self.experts, self.hidden, 2 * self.hidden,
                        group_size=self.group)(x)


def _setup(model, x, y, loss):
  params = model.init(jax.random.PRNGKey(0), x)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.sgd(0.01, momentum=0.9))

  def step(state, batch):
    def loss_fn(p):
      return loss(state.apply_fn(p, batch["x"]), batch["y"])
    val, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), val

  return state, {"x": x, "y": y}, step


def _mse(out, y):
  return jnp.mean((out - y) ** 2)


def _xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def mlp(batch=64, hidden=256):
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  return _setup(MLP([hidden, hidden, 128]),
                jax.random.normal(kx, (batch, 128)),
                jax.random.normal(ky, (batch, 128)), _mse)


def encoder(batch=8, seq=16, hidden=64, heads=4):
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  shape = (batch, seq, hidden)
  return _setup(EncoderLayer(hidden, heads), jax.random.normal(kx, shape),
                jax.random.normal(ky, shape), _mse)


def moe(batch=8, seq=8, hidden=32, experts=4):
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  shape = (batch, seq, hidden)
  return _setup(MoEBlock(hidden, experts, seq), jax.random.normal(kx, shape),
                jax.random.normal(ky, shape), _mse)


def convnet(batch=16, size=8, channels=8):
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x = jax.random.normal(kx, (batch, size, size, 3))
  y = jax.random.randint(ky, (batch,), 0, 10)
  return _setup(ConvNet(channels=channels), x, y, _xent)


MODELS = {"mlp": mlp, "encoder": encoder, "moe": moe, "conv": convnet}
