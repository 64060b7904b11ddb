"""Each pipeline stage updates its own parameters on its own submesh.

Parameters and optimizer state stay on their stage between steps, so in
steady state only the boundary activations and their gradients cross stage
boundaries (and, for a cross-stage reduction such as a global gradient norm,
a few scalars). The runtime counts those bytes (``last_run_stats``); the
tests compare them with the boundary shapes, and every step with the
single-device ``jax.jit`` step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import alpa_py
from alpa_py.compiler.errors import ScheduleError
from alpa_py.compiler.pipeline_program import SMALL_BYTES, Instr
from alpa_py.compiler.program_check import check_program
from pipeline_models import LayeredMLP, _mse, mlp_pipeline

WIDTH, DEPTH, BATCH = 64, 4, 32


def _clipped_state():
  model = LayeredMLP(width=WIDTH, depth=DEPTH)
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 16))
  params = model.init(jax.random.PRNGKey(0), x)
  tx = optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2))
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=tx)


def _boundary_bytes(num_stages: int) -> int:
  """Per step: each boundary between stages carries the layer activation
  (batch x width, float32) forward and its gradient back, summed over the
  micro-batches (each of batch / n rows)."""
  act = jax.eval_shape(
      lambda x: jnp.zeros((x.shape[0], WIDTH), jnp.float32),
      jax.ShapeDtypeStruct((BATCH, 16), jnp.float32))
  per_boundary = int(np.prod(act.shape)) * act.dtype.itemsize
  return (num_stages - 1) * per_boundary


def _close(a, b, rtol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=1e-6)


def _run(par, state, batch, steps=3):
  """(final state, loss, the crossing bytes of each step)."""
  ex = par.get_executable(state, batch)
  crossings = []
  for _ in range(steps):
    state, loss = par(state, batch)
    jax.block_until_ready(loss)
    crossings.append(dict(ex.last_run_stats.crossing_bytes))
  return state, loss, crossings


def _reference(step, state, batch, steps=3):
  for _ in range(steps):
    state, loss = jax.jit(step)(state, batch)
  return state, loss


def _method(num_stages=4, n=4):
  return alpa_py.PipeshardParallel(
      num_micro_batches=n,
      stage_option=alpa_py.UniformStageOption(num_stages=num_stages))


def _assert_steady(crossings, num_stages, scalars=0):
  expected = _boundary_bytes(num_stages)
  for c in crossings[1:]:  # after the first step: everything is in place
    assert c["activation"] == expected, (c, expected)
    assert c["activation-gradient"] == expected, (c, expected)
    assert c["parameter"] == 0 and c["gradient"] == 0, c
    assert c["scalar"] == scalars, c


@pytest.mark.parametrize("n", [1, 4])
def test_four_stages_update_their_own_parameters(n):
  state, batch, step = mlp_pipeline(depth=DEPTH, batch=BATCH)
  ref, ref_loss = _reference(step, state, batch)
  par = alpa_py.parallelize(step, method=_method(4, n))
  out, loss, crossings = _run(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _close(out, ref)
  _assert_steady(crossings, 4)
  assert crossings[0]["parameter"] > 0  # the first step places them
  print("bytes crossing stages per step:", crossings)

  ex = par.get_executable(state, batch)
  assert ex.plan.update_plan is None
  assert "stage-local update" in str(ex.plan)
  assert all(st.update is not None for st in ex.program.stages)
  # each new parameter is an ordinary array on the devices of the stage
  # that reads it, in the layout it reads it in
  program = ex.program
  leaves = jax.tree_util.tree_leaves(out.params)
  param_ids = program.invar_ids[:len(jax.tree_util.tree_leaves(state))]
  flat_state = jax.tree_util.tree_leaves(out)
  for t, leaf in zip(param_ids, flat_state):
    for st in program.stages:
      if t in st.forward.in_ids:
        sharding = st.forward.in_shardings[st.forward.in_ids.index(t)]
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  assert all(isinstance(x, jax.Array) for x in leaves)


def test_global_norm_clipping_sends_only_scalars():
  _, batch, step = mlp_pipeline(depth=DEPTH, batch=BATCH)
  state = _clipped_state()
  ref, ref_loss = _reference(step, state, batch)
  par = alpa_py.parallelize(step, method=_method(4, 4))
  out, loss, crossings = _run(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _close(out, ref)
  ex = par.get_executable(state, batch)
  program = ex.program
  assert program.combine is not None and program.update is None
  assert "cross-stage reduction" in str(ex.plan)
  # what crosses for the clipping: each other stage's partials to the
  # combining stage, the combined values back to them (all float32
  # scalars); and adam's step count, kept by one stage, read by the others
  partials = sum(len(st.partial.out_ids) for st in program.stages
                 if st.partial is not None
                 and st.index != program.combine_stage)
  acc_reads = sum(1 for t in program.combine.in_ids
                  if t in program.accumulated
                  and program.producer[t] != program.combine_stage)
  back = sum(len(set(program.combine.out_ids) & set(st.update.in_ids))
             for st in program.stages if st.index != program.combine_stage)
  count_ids = [t for t, path in zip(program.invar_ids, ex.signature.paths)
               if path.endswith(".count")]
  assert len(count_ids) == 1
  count_readers = sum(count_ids[0] in st.update.in_ids
                      for st in program.stages)
  scalars = 4 * (partials + acc_reads + back + count_readers - 1)
  assert 0 < scalars <= 4 * SMALL_BYTES
  _assert_steady(crossings, 4, scalars=scalars)
  print("bytes crossing stages per step:", crossings)


def test_update_reading_two_stages_large_values_stays_on_the_whole_mesh():
  """A bias update that reads another stage's bias gradient (not small):
  the update runs on the whole mesh, and the plan says why."""
  state, batch, _ = mlp_pipeline(depth=DEPTH, batch=BATCH)

  def step(state, batch):
    loss, grads = alpa_py.value_and_grad(_mse)(state.params, state.apply_fn,
                                               batch)
    new = state.apply_gradients(grads=grads)
    p = new.params["params"]
    bias = p["Dense_2"]["bias"] + 0.01 * grads["params"]["Dense_0"]["bias"]
    params = {"params": {**p, "Dense_2": {**p["Dense_2"], "bias": bias}}}
    return new.replace(params=params), loss

  ref, ref_loss = _reference(step, state, batch)
  par = alpa_py.parallelize(step, method=_method(2, 2))
  out, loss, crossings = _run(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _close(out, ref)
  ex = par.get_executable(state, batch)
  text = str(ex.plan)
  assert ex.program.update is not None
  assert "whole-mesh update: update op" in text and "stages [0, 1]" in text
  # parameters and gradients go to and from the whole mesh every step
  assert crossings[-1]["parameter"] > 0 and crossings[-1]["gradient"] > 0


def test_program_check_covers_the_update():
  state, batch, step = mlp_pipeline(depth=DEPTH, batch=BATCH)
  par = alpa_py.parallelize(step, method=_method(2, 2))
  ex = par.get_executable(state, batch)
  program = ex.program
  from alpa_py.driver.tracing import trace_step
  graph = trace_step(step, ex.signature, 2, unroll_layer_scans=True).graph
  check_program(program, graph)
  kinds = {i.task for i in program.instructions if i.kind is Instr.UPDATE}
  assert "U" in kinds
  no_avg = dataclasses.replace(program, instructions=tuple(
      i for i in program.instructions if i.kind is not Instr.AVG))
  with pytest.raises(ScheduleError, match="before it is complete"):
    check_program(no_avg, graph)
  # an update program run before the stages made its gradients
  upd = [i for i in program.instructions if i.task == "U"]
  rest = [i for i in program.instructions if i.task != "U"]
  with pytest.raises(ScheduleError, match="update of stage"):
    check_program(dataclasses.replace(program, instructions=tuple(upd + rest)),
                  graph)


@pytest.fixture
def two_hosts():
  pytest.importorskip("ray")
  cluster = alpa_py.init(cluster="ray", num_nodes=2, num_devices_per_node=4)
  try:
    yield cluster
  finally:
    alpa_py.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("clip", [False, True])
def test_stage_local_update_on_two_ray_hosts(two_hosts, clip):
  state, batch, step = mlp_pipeline(depth=DEPTH, batch=BATCH)
  if clip:
    state = _clipped_state()
  ref, ref_loss = _reference(step, state, batch)
  par = alpa_py.parallelize(step, method=_method(4, 4))
  out, loss, crossings = _run(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _close(out, ref)
  ex = par.get_executable(state, batch)
  assert [s.device_ids for s in ex.plan.stages] == [(0, 1), (2, 3), (4, 5),
                                                    (6, 7)]
  expected = _boundary_bytes(4)
  for c in crossings[1:]:
    assert c["activation"] == c["activation-gradient"] == expected, c
    assert c["parameter"] == 0 and c["gradient"] == 0, c
    assert (c["scalar"] > 0) == clip, c
  print("bytes crossing stages per step (Ray):", crossings)
  # outputs stay on the workers and can be fetched (checkpointed)
  saved = jax.tree_util.tree_map(np.asarray, out)
  _close(saved, ref)


@pytest.mark.slow
def test_tied_embedding_has_one_owner_stage_named_in_the_plan():
  """The GPT ties its embedding: the first stage's forward and the last
  stage's read it, one gradient sums both contributions, and the stage that
  sums it owns and updates it; the plan says which, and who receives it."""
  from pipeline_models import gpt_pipeline
  state, batch, step = gpt_pipeline(layers=2, batch=8)
  ref, ref_loss = _reference(step, state, batch, steps=2)
  par = alpa_py.parallelize(step, method=_method(2, 2))
  out, loss, crossings = _run(par, state, batch, steps=2)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  _close(out, ref, rtol=1e-4)
  notes = [n for n in par.get_executable(state, batch).plan.update_notes
           if "embedding" in n]
  assert len(notes) == 1, notes
  assert "is read by stages [0, 1]: stage" in notes[0] and "owns" in notes[0]
  # the embedding is the one parameter that crosses every step
  assert crossings[-1]["parameter"] > 0 and crossings[-1]["gradient"] == 0
  print(notes[0], crossings[-1])
