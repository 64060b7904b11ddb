"""PipeshardParallel: every pipeline plan computes the single-device step."""

import jax
import numpy as np
import pytest

import alpa_py
from pipeline_models import gpt_pipeline, mlp_pipeline

U, M, A = (alpa_py.UniformStageOption, alpa_py.ManualStageOption,
           alpa_py.AutoStageOption)

CASES = {
    # name: (setup kwargs, method kwargs)
    "mlp-2stage-manual-uniform-1f1b-4mb": (
        ("mlp", {}), dict(num_micro_batches=4, stage_option=U(num_stages=2))),
    "mlp-4stage-manual-uniform-gpipe-1mb": (
        ("mlp", {}), dict(num_micro_batches=1, pipeline_schedule="gpipe",
                          stage_option=U(num_stages=4))),
    "mlp-2stage-mixed-logical-meshes": (
        ("mlp", {}), dict(num_micro_batches=4, stage_option=M(
            ((0,), (1, 2, 3)), ((1, 4), (1, 4)), ((2, 2), (1, 4))))),
    "mlp-auto-layers-auto-stages": (
        ("mlp", {"boundaries": False}),
        dict(num_micro_batches=2, layer_option=alpa_py.AutoLayerOption(2),
             stage_option=A(cost_source="model"))),
    "gpt-2stage-manual-1f1b-4mb": (
        ("gpt", {}), dict(num_micro_batches=4, stage_option=U(num_stages=2))),
    "gpt-4stage-gpipe-8mb": (
        ("gpt", {}), dict(num_micro_batches=8, pipeline_schedule="gpipe",
                          stage_option=U(num_stages=4))),
    "gpt-auto-layers-2stage-1mb": (
        ("gpt", {"boundaries": False}),
        dict(num_micro_batches=1, layer_option=alpa_py.AutoLayerOption(2),
             stage_option=U(num_stages=2))),
    "gpt-4stage-mixed-logical-1f1b-4mb": (
        ("gpt", {}), dict(num_micro_batches=4, stage_option=M(
            ((0,), (1,), (2,), (3,)), ((1, 2),) * 4, ((1, 2), (2, 1), (1, 2), (2, 1))))),
}


def _setup(kind, kw):
  return (mlp_pipeline if kind == "mlp" else gpt_pipeline)(**kw)


def _run(step, state, batch, n=3):
  for _ in range(n):
    state, loss = step(state, batch)
    jax.block_until_ready(loss)
  return state, loss


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_single_device(name):
  (kind, kw), method_kw = CASES[name]
  state, batch, step = _setup(kind, kw)
  ref_state, ref_loss = _run(jax.jit(step), state, batch)
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(**method_kw))
  out_state, loss = _run(par, state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(out_state), jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  ex = par.get_executable(state, batch)
  assert str(ex.plan).startswith("PipeshardPlan")
  assert len(ex.memory_per_device()) == len(ex.plan.stages)
  assert all("HloModule" in t for t in ex.hlo_text())
  used = sorted(d for s in ex.plan.stages for d in s.device_ids)
  assert used == list(range(8))


def test_mixed_logical_meshes_reshard_between_stages():
  state, batch, step = mlp_pipeline()
  method = alpa_py.PipeshardParallel(num_micro_batches=2, stage_option=M(
      ((0,), (1, 2, 3)), ((1, 4), (1, 4)), ((2, 2), (1, 4))))
  par = alpa_py.parallelize(step, method=method)
  par(state, batch)
  ex = par.get_executable(state, batch)
  assert [s.logical_shape for s in ex.plan.stages] == [(2, 2), (1, 4)]
  assert ex.last_run_stats.transfers > 0


def test_1f1b_holds_fewer_activations_than_gpipe():
  state, batch, step = gpt_pipeline(layers=4, batch=16)
  peaks = {}
  for schedule in ("gpipe", "1f1b"):
    method = alpa_py.PipeshardParallel(num_micro_batches=8,
                                       pipeline_schedule=schedule,
                                       stage_option=U(num_stages=4))
    par = alpa_py.parallelize(step, method=method)
    _, loss = par(state, batch)
    jax.block_until_ready(loss)
    peaks[schedule] = par.get_executable(state, batch).last_run_stats.peak_activation_bytes
  assert peaks["1f1b"] < peaks["gpipe"], peaks


def test_schedule_is_exposed():
  state, batch, step = mlp_pipeline()
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=4, stage_option=U(num_stages=2)))
  ex = par.get_executable(state, batch)
  tasks = [t for clock in ex.plan.schedule for t in clock.split()]
  assert sorted(tasks) == sorted(f"{k}{s}.{m}" for k in "FB" for s in range(2)
                                 for m in range(4))
  assert ex.plan.schedule_name == "1f1b"


def test_instruction_list_is_explicit():
  from alpa_py.compiler.pipeline_program import Instr
  state, batch, step = mlp_pipeline()
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=4, stage_option=U(num_stages=2)))
  ex = par.get_executable(state, batch)
  kinds = [i.kind for i in ex.instructions]
  assert kinds.count(Instr.RUN) == 2 * 2 * 4
  assert Instr.ACC in kinds and Instr.FREE in kinds and Instr.RECV in kinds
  # parameters move to a stage once per step, activations per micro-batch
  recv_params = [i for i in ex.instructions
                 if i.kind is Instr.RECV and i.micro_batch is None]
  assert recv_params and len({(i.tensor, i.stage, i.task)
                              for i in recv_params}) == len(recv_params)
  # every micro-batch tensor a task produces is freed by the end
  produced = {(i.tensor, i.micro_batch) for i in ex.instructions
              if i.kind is Instr.FREE}
  assert len(produced) > 0
  par(state, batch)
  assert ex.last_run_stats.tasks == 16


def test_local_pipeline_runs_the_one_interpreter(monkeypatch):
  """The local backend runs runtime.pipeline_interpreter.interpret (the Ray
  workers run the same function: test_ray checks that side)."""
  from alpa_py.runtime import pipeline_interpreter as pi
  seen = []
  original = pi.interpret

  def counting(program, transport):
    seen.append(type(transport).__name__)
    return original(program, transport)

  monkeypatch.setattr(pi, "interpret", counting)
  state, batch, step = mlp_pipeline()
  par = alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=2, stage_option=U(num_stages=2)))
  out, loss = par(state, batch)
  _, ref_loss = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  assert seen == ["LocalTransport"]
