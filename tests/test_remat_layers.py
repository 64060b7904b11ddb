"""remat_layer=True: each stage's backward recomputes its layers' forward.

Every plan is checked against the single-device step; the pipeline's
measured peak of live per-micro-batch tensors (``RunStats``) drops, and the
recomputation is priced in the stage plans.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_py
from pipeline_models import gpt_pipeline, mlp_pipeline
from recurrent_model import recurrent_pipeline

U = alpa_py.UniformStageOption

MODELS = {
    # name: (setup, layer_num)
    "gpt": (lambda: gpt_pipeline(boundaries=False), 4),
    "recurrent": (lambda: recurrent_pipeline(pipeline_boundaries=False), 2),
}


def _method(layer_option, force_data_parallel=False, stage_option=None,
            num_micro_batches=2):
  return alpa_py.PipeshardParallel(
      num_micro_batches=num_micro_batches, layer_option=layer_option,
      stage_option=stage_option or U(num_stages=2),
      default_auto_sharding_option=alpa_py.AutoShardingOption(
          force_data_parallel=force_data_parallel))


def _check_step(par, step, state, batch, rtol=1e-4):
  """One step of ``par`` against the single-device step; its executable."""
  ref_state, ref_loss = jax.jit(step)(state, batch)
  out, loss = par(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=rtol)
  for a, b in zip(jax.tree_util.tree_leaves(out),
                  jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                               atol=1e-6)
  return par.get_executable(state, batch)


# the GPT plain and the recurrent model data-parallel run by default; the
# other two pairs are slow
@pytest.mark.parametrize("model,force_data_parallel", [
    ("gpt", False), ("recurrent", True),
    pytest.param("gpt", True, marks=pytest.mark.slow),
    pytest.param("recurrent", False, marks=pytest.mark.slow)])
def test_remat_layer_matches_single_device_and_keeps_fewer_activations(
    model, force_data_parallel):
  setup, layer_num = MODELS[model]
  state, batch, step = setup()
  peaks, exs = {}, {}
  for remat in (False, True):
    par = alpa_py.parallelize(step, method=_method(
        alpa_py.AutoLayerOption(layer_num, remat_layer=remat),
        force_data_parallel))
    ex = _check_step(par, step, state, batch)
    peaks[remat] = ex.last_run_stats.peak_activation_bytes
    exs[remat] = ex
  print(f"{model} force_data_parallel={force_data_parallel}: peak activation "
        f"bytes {peaks[False]} -> {peaks[True]} with remat_layer")
  assert peaks[True] < 0.5 * peaks[False], peaks
  plan = exs[True].plan
  assert plan.remat_layer and "remat_layer on" in str(plan)
  per_stage = layer_num // 2
  for s in plan.stages:
    assert s.num_recomputed_ops > 0, s
    # a stage of several layers keeps the inputs of all but its first
    assert (s.num_residuals > 0) == (per_stage > 1), s
  for s in exs[False].plan.stages:
    assert s.num_recomputed_ops == 0 and s.num_residuals == 0
  if force_data_parallel and model == "gpt":
    # the recomputing backward still keeps per-device partial gradients
    notes = [s.gradient_reduction for s in plan.stages]
    assert all(n.startswith("once per step") for n in notes), notes
    assert notes == [s.gradient_reduction for s in exs[False].plan.stages]


def test_recomputation_is_priced_in_the_stage_plans():
  state, batch, step = mlp_pipeline(boundaries=False)
  predicted = {}
  for remat in (False, True):
    par = alpa_py.parallelize(step, method=_method(
        alpa_py.AutoLayerOption(2, remat_layer=remat)))
    ex = par.get_executable(state, batch)
    predicted[remat] = [s.predicted_seconds for s in ex.plan.stages]
  for plain, remat in zip(predicted[False], predicted[True]):
    assert remat > plain, predicted


@pytest.mark.parametrize("cost_source", [
    "model", pytest.param("profile", marks=pytest.mark.slow)])
def test_remat_layer_with_auto_stages(cost_source):
  state, batch, step = mlp_pipeline(boundaries=False)
  par = alpa_py.parallelize(step, method=_method(
      alpa_py.AutoLayerOption(2, remat_layer=True),
      stage_option=alpa_py.AutoStageOption(cost_source=cost_source)))
  ex = _check_step(par, step, state, batch)
  assert ex.plan.remat_layer


@pytest.mark.slow
def test_remat_layer_with_manual_layers_on_a_checkpointed_model():
  """``remat_layer`` on top of the user's own ``jax.checkpoint``
  (``nn.remat``) blocks."""
  state, batch, step = recurrent_pipeline("associative", remat=True)
  par = alpa_py.parallelize(step, method=_method(
      alpa_py.ManualLayerOption(remat_layer=True)))
  ex = _check_step(par, step, state, batch)
  assert all(s.num_recomputed_ops > 0 for s in ex.plan.stages)


@pytest.mark.slow
def test_user_checkpoint_keeps_its_recompute_cost():
  """A ``jax.checkpoint``-ed block's recomputation is part of the backward
  ops the stage plans price, and the pipeline keeps fewer activations."""
  predicted, peaks = {}, {}
  for remat in (False, True):
    state, batch, step = recurrent_pipeline("associative", remat=remat)
    par = alpa_py.parallelize(step, method=_method(
        alpa_py.ManualLayerOption()))
    _, loss = par(state, batch)
    jax.block_until_ready(loss)
    ex = par.get_executable(state, batch)
    predicted[remat] = sum(s.predicted_seconds for s in ex.plan.stages)
    peaks[remat] = ex.last_run_stats.peak_activation_bytes
  assert predicted[True] > predicted[False], predicted
  assert peaks[True] < peaks[False], peaks


def test_remat_layer_option_is_validated():
  assert alpa_py.AutoLayerOption(2, remat_layer=True).remat_layer
  assert alpa_py.ManualLayerOption(remat_layer=True).remat_layer
  with pytest.raises(TypeError, match="remat_layer"):
    alpa_py.AutoLayerOption(2, remat_layer="yes")
  with pytest.raises(TypeError, match="remat_layer"):
    alpa_py.ManualLayerOption(remat_layer=1)


class _DropoutMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      if i:
        alpa_py.mark_pipeline_boundary()
      x = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(32)(x)))
    return nn.Dense(8)(x)


def test_recomputed_random_bits_keep_the_reduction_per_micro_batch():
  """Random bits drawn per device (the shard_map backward of a deferred
  data-parallel stage) are not a slice of the micro-batch's: a backward
  that recomputes a dropout mask keeps reducing per micro-batch, says why,
  and equals the pipeline without ``force_data_parallel`` (dropout drawn
  per micro-batch is not the single-device step's)."""
  model = _DropoutMLP()
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (32, 16)),
           "y": jax.random.normal(ky, (32, 8))}
  params = model.init({"params": jax.random.PRNGKey(0),
                       "dropout": jax.random.PRNGKey(2)}, batch["x"])
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.sgd(0.05))
  key = jax.random.PRNGKey(3)

  def step(state, batch, key):
    def loss_of(p):
      out = state.apply_fn(p, batch["x"], rngs={"dropout": key})
      return jnp.mean((out - batch["y"]) ** 2)
    loss, grads = alpa_py.value_and_grad(loss_of)(state.params)
    return state.apply_gradients(grads=grads), loss

  outs = {}
  for dp in (False, True):
    par = alpa_py.parallelize(step, batch_argnums=(1,), method=_method(
        alpa_py.ManualLayerOption(remat_layer=True), force_data_parallel=dp))
    outs[dp] = par(state, batch, key)
    notes = [s.gradient_reduction
             for s in par.get_executable(state, batch, key).plan.stages]
  assert all(n.startswith("per micro-batch (") and "random bits" in n
             for n in notes), notes
  for a, b in zip(jax.tree_util.tree_leaves(outs[True]),
                  jax.tree_util.tree_leaves(outs[False])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-6)
