"""Small training steps (state, batch, step) shared by the tests."""

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from alpa_py.models import MLP, ConvNet, GPT, GPTConfig, MoEModel
from alpa_py.models.gpt import lm_loss


def _state(model, sample, tx=None, seed=0):
  params = model.init(jax.random.PRNGKey(seed), sample)
  # SGD with momentum: exact comparisons need an update that does not
  # amplify rounding (Adam divides tiny gradients by their own size).
  tx = tx or optax.sgd(0.05, momentum=0.9)
  return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _step(loss_of):
  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_of)(state.params, state.apply_fn, batch)
    return state.apply_gradients(grads=grads), loss
  return step


def _mse(params, apply_fn, batch):
  return jnp.mean((apply_fn(params, batch["x"]) - batch["y"]) ** 2)


def _lm(params, apply_fn, batch):
  return lm_loss(apply_fn(params, batch["tokens"]), batch["tokens"])


def _xent(params, apply_fn, batch):
  logits = apply_fn(params, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def mlp_setup(hidden=64, batch=32, din=16, dout=16, layers=3, tx=None):
  model = MLP([hidden] * (layers - 1) + [dout])
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  b = {"x": jax.random.normal(kx, (batch, din)),
       "y": jax.random.normal(ky, (batch, dout))}
  return _state(model, b["x"], tx), b, _step(_mse)


def gpt_setup(layers=2, hidden=64, heads=4, seq=16, vocab=128, batch=8):
  cfg = GPTConfig(vocab_size=vocab, seq_len=seq, hidden=hidden, num_heads=heads,
                  num_layers=layers)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, vocab)
  b = {"tokens": tokens}
  return _state(GPT(cfg), tokens), b, _step(_lm)


def moe_setup(batch=8, seq=8, hidden=32, experts=8, vocab=64,
              router="gshard_top2"):
  model = MoEModel(vocab_size=vocab, hidden=hidden, num_experts=experts,
                   num_layers=1, router=router)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, vocab)
  return _state(model, tokens), {"tokens": tokens}, _step(_lm)


def conv_setup(batch=8, size=8, channels=8):
  model = ConvNet(channels=channels, num_classes=10)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 10)
  b = {"x": x, "y": y}
  return _state(model, x), b, _step(_xent)


SETUPS = {"mlp": mlp_setup, "gpt": gpt_setup, "moe": moe_setup,
          "conv": conv_setup}
