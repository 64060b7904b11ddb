"""A step written in mixed precision (bf16 compute, fp32 master weights and
optimizer state) is planned as written: under ShardParallel and
PipeshardParallel it equals ``jax.jit`` of the same step, and the master
weights stay fp32. (SGD with momentum: Adam's normalisation turns bf16
rounding in a tiny gradient into a full step of either sign, in jit too.)"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_py
from alpa_py.models import GPT, GPTConfig

from models_for_tests import _lm
from pipeline_models import _step


def _bf16_gpt():
  cfg = GPTConfig(vocab_size=128, seq_len=16, hidden=64, num_heads=4,
                  num_layers=2, dtype=jnp.bfloat16, pipeline_boundaries=True)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (16, 16), 0, 128)
  params = model.init(jax.random.PRNGKey(0), tokens)
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.sgd(0.1, momentum=0.9))
  return state, {"tokens": tokens}, _step(_lm)


METHODS = {
    "shard": lambda: alpa_py.ShardParallel(devices=jax.devices()[:4],
                                           mesh_shape=(2, 2)),
    "pipeshard": lambda: alpa_py.PipeshardParallel(
        devices=jax.devices()[:4], num_micro_batches=2,
        stage_option=alpa_py.UniformStageOption(num_stages=2)),
}


@pytest.mark.slow  # ~1 min per method here
@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_step_matches_jit_and_keeps_fp32_master_weights(name):
  state, batch, step = _bf16_gpt()
  leaves = jax.tree_util.tree_leaves(state.params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  par = alpa_py.parallelize(step, method=METHODS[name]())
  ours, ref = state, state
  for _ in range(3):
    ours, loss = par(ours, batch)
    jax.block_until_ready(loss)
    ref, ref_loss = jax.jit(step)(ref, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-2)
  for a, b in zip(jax.tree_util.tree_leaves(ours.params),
                  jax.tree_util.tree_leaves(ref.params)):
    assert a.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-2,
                               atol=2e-3)
  for a in jax.tree_util.tree_leaves(ours.opt_state):
    if jnp.issubdtype(a.dtype, jnp.floating):
      assert a.dtype == jnp.float32
