"""Pipelined test steps: the gradient via alpa_py.value_and_grad."""

import flax.linen as nn
import jax
import optax
from flax.training import train_state

import alpa_py
from alpa_py.models import GPT, GPTConfig

from models_for_tests import _lm, _mse


class LayeredMLP(nn.Module):
  width: int = 64
  depth: int = 4
  boundaries: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      if self.boundaries and i > 0:
        alpa_py.mark_pipeline_boundary()
      x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(8)(x)


def _step(loss_of):
  def step(state, batch):
    loss, grads = alpa_py.value_and_grad(loss_of)(state.params, state.apply_fn,
                                                  batch)
    return state.apply_gradients(grads=grads), loss
  return step


def _state(model, sample):
  params = model.init(jax.random.PRNGKey(0), sample)
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=optax.sgd(0.05, momentum=0.9))


def mlp_pipeline(depth=4, batch=32, boundaries=True):
  model = LayeredMLP(depth=depth, boundaries=boundaries)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  b = {"x": jax.random.normal(kx, (batch, 16)), "y": jax.random.normal(ky, (batch, 8))}
  return _state(model, b["x"]), b, _step(_mse)


def gpt_pipeline(layers=4, batch=16, boundaries=True, hidden=64, seq=16):
  cfg = GPTConfig(vocab_size=128, seq_len=seq, hidden=hidden, num_heads=4,
                  num_layers=layers, pipeline_boundaries=boundaries)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq), 0, 128)
  return _state(GPT(cfg), tokens), {"tokens": tokens}, _step(_lm)
