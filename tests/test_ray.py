"""The Ray backend: two simulated hosts with 4 CPU devices each.

Each test starts its own local Ray cluster (through alpa_py.init or ray.init)
and stops only what it started. Ray stays on loopback
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set in conftest).
"""

import time

import jax
import numpy as np
import pytest

import alpa_py
from alpa_py.runtime.cluster import current_cluster
from models_for_tests import _lm, gpt_setup, mlp_setup

ray = pytest.importorskip("ray")


@pytest.fixture
def two_hosts():
  cluster = alpa_py.init(cluster="ray", num_nodes=2, num_devices_per_node=4)
  try:
    yield cluster
  finally:
    alpa_py.shutdown()
  assert not ray.is_initialized()  # we started it, so it is stopped


def _close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def _three_steps_both_ways(state, batch, step):
  """3 steps undecorated and 3 under ShardParallel on a (2, 4) mesh."""
  ref = state
  for _ in range(3):
    ref, ref_loss = jax.jit(step)(ref, batch)
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(mesh_shape=(2, 4)))
  out = state
  for _ in range(3):
    out, loss = par(out, batch)
  return ref, ref_loss, out, loss


def test_shard_parallel_across_two_hosts(two_hosts):
  assert two_hosts.num_hosts == 2 and two_hosts.num_devices == 8
  ref, ref_loss, out, loss = _three_steps_both_ways(
      *mlp_setup(hidden=64, batch=32))
  assert type(loss).__name__ == "DistributedArray"  # stays on the workers
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  _close(out.params, ref.params)
  _close(out.opt_state, ref.opt_state)


def _marked_step(state, batch):
  loss, grads = alpa_py.value_and_grad(_lm)(state.params, state.apply_fn, batch)
  return state.apply_gradients(grads=grads), loss


@pytest.mark.slow  # test_two_stage_pipeline_across_two_hosts counts calls too
def test_driver_calls_do_not_grow_with_micro_batches(two_hosts):
  state, batch, _ = gpt_setup(batch=16)
  per_step = {}
  for n in (1, 4):
    par = alpa_py.parallelize(_marked_step, method=alpa_py.ShardParallel(
        mesh_shape=(2, 4), num_micro_batches=n if n > 1 else None))
    par.get_executable(state, batch)
    before = two_hosts.remote_calls
    s = state
    for _ in range(2):
      s, loss = par(s, batch)
    per_step[n] = (two_hosts.remote_calls - before) / 2
  assert per_step[1] == per_step[4] == len(two_hosts.workers)


def test_dead_worker_fails_fast_then_restart_and_resume_from_checkpoint(
    tmp_path):
  import orbax.checkpoint as ocp
  state, batch, step = mlp_setup(hidden=64, batch=32)
  ref = state
  for _ in range(3):
    ref, _ = jax.jit(step)(ref, batch)
  alpa_py.init(cluster="ray", num_nodes=2, num_devices_per_node=4)
  try:
    par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(mesh_shape=(2, 4)))
    s = state
    for _ in range(2):
      s, _ = par(s, batch)
    saved = jax.tree_util.tree_map(np.asarray, s)
    ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", saved)
    ray.kill(current_cluster().workers[1])
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="worker of the Ray cluster failed"):
      par(s, batch)
    assert time.perf_counter() - t0 < 60
  finally:
    alpa_py.shutdown()
  alpa_py.init(cluster="ray", num_nodes=2, num_devices_per_node=4)
  try:
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt", item=saved)
    _close(restored, saved)  # identical parameters after the restart
    resumed = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state),
                                           jax.tree_util.tree_leaves(restored))
    par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(mesh_shape=(2, 4)))
    out, _ = par(resumed, batch)
    _close(out.params, ref.params)
  finally:
    alpa_py.shutdown()


def test_worker_killed_during_a_step(two_hosts):
  import threading
  from pipeline_models import gpt_pipeline
  state, batch, step = gpt_pipeline(layers=2, batch=16)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=8, stage_option=alpa_py.UniformStageOption(num_stages=2)))
  s, _ = par(state, batch)  # compiled and loaded
  outcome = {}

  def run():
    try:
      par(s, batch)
      outcome["result"] = "finished"
    except RuntimeError as e:
      outcome["result"] = str(e)

  thread = threading.Thread(target=run)
  t0 = time.perf_counter()
  thread.start()
  time.sleep(0.3)
  ray.kill(two_hosts.workers[0])
  thread.join(timeout=120)
  assert not thread.is_alive(), "the step hung after a worker died"
  print("in-flight step:", outcome["result"][:60])
  if outcome["result"] != "finished":  # it died mid-step, as intended
    assert "worker of the Ray cluster failed" in outcome["result"]
  with pytest.raises(RuntimeError, match="worker of the Ray cluster failed"):
    par(s, batch)
  assert time.perf_counter() - t0 < 120


def test_unreachable_address_fails_fast():
  t0 = time.perf_counter()
  with pytest.raises(ConnectionError, match="cannot reach a Ray cluster at "
                     "'127.0.0.1:1'"):
    alpa_py.init(cluster="ray", address="127.0.0.1:1")
  assert time.perf_counter() - t0 < 10


def test_more_hosts_than_the_cluster_has():
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  try:
    with pytest.raises(ValueError, match=r"asked for 5 hosts .* has 2 CPUs"):
      alpa_py.init(cluster="ray", num_nodes=5)
  finally:
    alpa_py.shutdown()
    ray.shutdown()


def test_gpt_state_fed_back_in_its_output_layout(two_hosts):
  # regression: outputs whose layout differs from the inputs' (the new
  # state) must be resharded on the workers before the next step
  ref, ref_loss, out, loss = _three_steps_both_ways(*gpt_setup())
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  _close(out.params, ref.params)


def test_two_stage_pipeline_across_two_hosts(two_hosts):
  from pipeline_models import gpt_pipeline
  state, batch, step = gpt_pipeline(layers=2, batch=16)
  ref = state
  for _ in range(3):
    ref, ref_loss = jax.jit(step)(ref, batch)
  calls = {}
  # (micro-batches, force_data_parallel): with the option, each stage keeps
  # per-device partial gradients and reduces them once per step on its host
  for n, dp in ((2, False), (4, False), (2, True)):
    par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
        num_micro_batches=n, stage_option=alpa_py.UniformStageOption(num_stages=2),
        default_auto_sharding_option=alpa_py.AutoShardingOption(
            force_data_parallel=dp)))
    ex = par.get_executable(state, batch)
    assert [s.device_ids for s in ex.plan.stages] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert all(s.gradient_reduction.startswith("once per step") == dp
               for s in ex.plan.stages), str(ex.plan)
    out = state
    before = two_hosts.remote_calls
    for _ in range(3):
      out, loss = par(out, batch)
    calls[(n, dp)] = (two_hosts.remote_calls - before) / 3
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
    _close(out.params, ref.params)
  # one call per worker (+ one to clear the mailbox) per step, whatever the
  # number of micro-batches
  assert set(calls.values()) == {len(two_hosts.workers) + 1}


def test_stage_spanning_hosts_is_rejected(two_hosts):
  from pipeline_models import mlp_pipeline
  state, batch, step = mlp_pipeline()
  method = alpa_py.PipeshardParallel(
      num_micro_batches=2, stage_option=alpa_py.ManualStageOption(
          ((0,), (1, 2, 3)), ((1, 2), (1, 6))))
  with pytest.raises(ValueError, match="each stage must fit in one host"):
    alpa_py.parallelize(step, method=method)(state, batch)


def test_ray_pipeline_runs_the_one_interpreter(two_hosts):
  """Each worker runs its stages with runtime.pipeline_interpreter.interpret,
  the function the local backend calls (test_pipeshard checks that side)."""
  from pipeline_models import mlp_pipeline
  state, batch, step = mlp_pipeline()

  def install(worker):
    from alpa_py.runtime import pipeline_interpreter as pi
    original = pi.interpret
    worker.interpreted = []

    def counting(program, transport):
      worker.interpreted.append(type(transport).__name__)
      return original(program, transport)

    pi.interpret = counting
    return True

  ray.get([w.__ray_call__.remote(install) for w in two_hosts.workers])
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=2, stage_option=alpa_py.UniformStageOption(num_stages=2)))
  out, loss = par(state, batch)
  ref, ref_loss = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  calls = ray.get([w.__ray_call__.remote(lambda w: list(w.interpreted))
                   for w in two_hosts.workers])
  assert calls == [["WorkerTransport"], ["WorkerTransport"]]
