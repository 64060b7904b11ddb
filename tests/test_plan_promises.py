"""Plans keep their promises: each method means what it says for the whole
step, and the compiled program does what the plan says.

Plan shapes are asserted under a GPU preset profile (not the measured
``cpu`` one) so that they do not depend on this machine; every plan is also
checked against the single-device step.
"""

import dataclasses
import warnings

import jax
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.hlo_stats import collective_counts
from plan_shape_models import MODELS

PROFILE = "a100_8x_nvlink_100gbps"
OPT = alpa_py.AutoShardingOption(cost_profile=PROFILE)
MESHES = [(4,), (1, 4), (2, 2)]


def _compile(model, method_cls, mesh, strict=True, **kw):
  state, batch, step = MODELS[model]()
  method = method_cls(devices=jax.devices()[:4], mesh_shape=mesh,
                      auto_sharding_option=kw.pop("option", OPT), **kw)
  par = alpa_py.parallelize(step, method=method)
  with warnings.catch_warnings():
    if strict:  # the compiled collectives must be the predicted ones
      warnings.simplefilter("error", alpa_py.PlanMismatchWarning)
    ex = par.get_executable(state, batch)
  return state, batch, step, par, ex


def _same_as_single_device(state, batch, step, par, reference=None):
  """One step of ``par`` equals ``reference`` (default: ``jax.jit``)."""
  ref_state, ref_loss = (reference or jax.jit(step))(state, batch)
  out_state, loss = par(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(out_state.params),
                  jax.tree_util.tree_leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5)


def _counts(ex):
  return collective_counts(ex.hlo_text())


def _batch_split(ex):
  """Every dot/conv splits its batch loop: none runs on the whole batch."""
  return all(o.strategy != "replicated" for o in ex.plan.ops)


def _data_axes(mesh):
  return tuple(a for a, s in zip(("x", "y"), mesh) if s > 1)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("mesh", MESHES)
def test_data_parallel_is_batch_split_with_one_gradient_all_reduce(model, mesh):
  state, batch, step, par, ex = _compile(model, alpa_py.DataParallel, mesh)
  counts = _counts(ex)
  assert counts["all-reduce"] == 1  # every gradient, merged by XLA
  assert counts["reduce-scatter"] == 0 and counts["all-to-all"] == 0
  assert _batch_split(ex)
  assert dict(ex.plan.predicted_collectives) == counts
  assert not ex.plan.collective_mismatch
  for t in ex.plan.inputs:
    if "params" in t.name:
      assert t.spec == jax.sharding.PartitionSpec(), t
  _same_as_single_device(state, batch, step, par)


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("mesh", MESHES)
def test_zero2_reduce_scatters_gradients_and_gathers_parameters(model, mesh):
  state, batch, step, par, ex = _compile(model, alpa_py.Zero2Parallel, mesh)
  counts = _counts(ex)
  assert counts["reduce-scatter"] >= 1 and counts["all-gather"] >= 1
  assert _batch_split(ex)
  assert dict(ex.plan.predicted_collectives) == counts
  sharded_state = [t for t in ex.plan.inputs if "opt_state" in t.name
                   and t.spec != jax.sharding.PartitionSpec()]
  assert sharded_state, "optimizer state is not sharded"
  for t in ex.plan.outputs:  # updated parameters come back whole
    if ".params" in t.name:
      assert t.spec == jax.sharding.PartitionSpec(), t
  _same_as_single_device(state, batch, step, par)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_zero3_keeps_parameters_sharded(model):
  state, batch, step, par, ex = _compile(model, alpa_py.Zero3Parallel, (4,))
  counts = _counts(ex)
  assert counts["reduce-scatter"] >= 1 and counts["all-gather"] >= 1
  assert dict(ex.plan.predicted_collectives) == counts
  big = [t for t in ex.plan.inputs if "params" in t.name and len(t.shape) >= 2
         and "opt_state" not in t.name]
  assert big and all(t.spec != jax.sharding.PartitionSpec() for t in big)
  _same_as_single_device(state, batch, step, par)


def test_zero3_all_gather_threshold_keeps_small_parameters_whole():
  opt = dataclasses.replace(OPT, force_zero_stage_3_all_gather_threshold=4096)
  _, _, _, _, ex = _compile("mlp", alpa_py.Zero3Parallel, (4,), option=opt)
  for t in ex.plan.inputs:
    if "params" in t.name:
      nbytes = int(np.prod(t.shape)) * 4
      whole = t.spec == jax.sharding.PartitionSpec()
      assert whole == (nbytes < 4096), t


def test_force_batch_dim_on_a_2d_mesh_leaves_the_other_axis_free():
  opt = dataclasses.replace(OPT, force_batch_dim_to_mesh_dim=0)
  # (this plan's prediction is not exact: XLA turns some of its reshapes
  # of mixed-order specs into cheaper collectives; that is warned, not
  # asserted, here)
  state, batch, step, par, ex = _compile("encoder", alpa_py.ShardParallel,
                                         (2, 2), strict=False, option=opt)
  assert ex.plan.input_spec("arg1['x']")[0] in ("x", ("x",), ("x", "y"))
  _same_as_single_device(state, batch, step, par)


def test_a_batch_that_does_not_divide_the_data_axis_names_both_sizes():
  state, batch, step = MODELS["mlp"](batch=6)
  opt = dataclasses.replace(OPT, force_batch_dim_to_mesh_dim=1)
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      devices=jax.devices()[:4], mesh_shape=(1, 4), auto_sharding_option=opt))
  with pytest.raises(ValueError, match=r"batch dim 0 \(=6\) must be divisible "
                     r"by the data axis .*=4 devices"):
    par.get_executable(state, batch)


def _abstract_mlp(hidden, batch, depth=2):
  state, data, step = MODELS["mlp"](batch=8, hidden=8)
  del state, data
  import optax
  from flax.training import train_state
  from alpa_py.models import MLP
  model = MLP([hidden] * depth + [hidden])
  x = jax.ShapeDtypeStruct((batch, hidden), np.float32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  state = jax.eval_shape(lambda p: train_state.TrainState.create(
      apply_fn=model.apply, params=p, tx=optax.sgd(0.01, momentum=0.9)), params)
  return state, {"x": x, "y": x}, step


def test_the_ilp_finds_the_cheaper_2x8_plan_with_mixed_reductions(monkeypatch):
  """Data parallel over two nodes of 8 V100s, planned on an abstract (2, 8)
  mesh (nothing runs): reduce-scattering each gradient inside a node and
  all-reducing the 1/8 left across nodes (then gathering inside the node)
  beats every plan that reduces both axes one way."""
  from alpa_py.compiler.strategies import loop_nest
  from alpa_py.driver.analysis import StepAnalysis
  state, batch, step = _abstract_mlp(hidden=1024, batch=4096)
  analysis = StepAnalysis(step, (state, batch), num_devices=16)
  method = alpa_py.DataParallel(mesh_shape=(2, 8))
  mixed = analysis.solve_method(method, "v100_8x_nvlink_25gbps")
  original = loop_nest._reduce_scatter_variants

  def one_way_only(spec, info, red_axes, mesh):
    return (v for v in original(spec, info, red_axes, mesh)
            if len(v[1]) == len(red_axes))

  monkeypatch.setattr(loop_nest, "_reduce_scatter_variants", one_way_only)
  one_way = analysis.solve_method(method, "v100_8x_nvlink_25gbps")
  print(f"(2, 8) V100: mixed {mixed.objective:.4f} s, one way "
        f"{one_way.objective:.4f} s")
  assert mixed.objective < 0.9 * one_way.objective
  assert any("+RS1+AR0" in name for _, name in mixed.op_strategies)


def _pipeline(step, force_data_parallel=True):
  opt = dataclasses.replace(OPT, force_data_parallel=force_data_parallel)
  return alpa_py.parallelize(step, method=alpa_py.PipeshardParallel(
      num_micro_batches=2,
      stage_option=alpa_py.UniformStageOption(num_stages=2),
      default_auto_sharding_option=opt))


def _pipeline_data_parallel(make, reference=None):
  """The data-parallel pipeline's executable, after checking one step
  against ``reference`` (default: the single-device step)."""
  state, batch, step = make()
  par = _pipeline(step)
  ex = par.get_executable(state, batch)
  _same_as_single_device(state, batch, step, par, reference)
  return ex


@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_pipeline_stages_keep_force_data_parallel(model):
  """The option reaches every stage: each stage splits the batch of every
  dot and keeps its parameters whole; its backward keeps per-device partial
  gradients (no collective per micro-batch) and its reduce program reduces
  them in one merged all-reduce per step, after accumulation. The GPT ties
  its embedding, so one stage's backward hands a partial gradient to the
  other's."""
  from pipeline_models import gpt_pipeline, mlp_pipeline
  ex = _pipeline_data_parallel(
      {"mlp": mlp_pipeline, "gpt": gpt_pipeline}[model])
  for stage, program in zip(ex.plan.stages, ex.program.stages):
    assert all(s != "replicated" for _, s in stage.strategies), stage
    for t in stage.inputs:
      if "params" in t.name:
        assert t.spec == jax.sharding.PartitionSpec(), t
    assert stage.gradient_reduction.startswith("once per step"), stage
    counts = collective_counts(program.backward.hlo_text())
    assert sum(counts.values()) == 0, counts
    counts = collective_counts(program.reduce.hlo_text())
    assert counts["all-reduce"] == 1 and sum(counts.values()) == 1, counts
  reduces = [i for i in ex.program.instructions
             if i.kind is alpa_py.compiler.pipeline_program.Instr.REDUCE]
  assert len(reduces) == len(ex.program.stages)
  assert "gradients reduced once per step" in str(ex.plan)


def test_a_batch_statistic_keeps_the_reduction_per_micro_batch():
  """A backward that reads a value reduced over the batch (a centring
  mean) cannot keep per-device partials: the stage says why and still
  equals the pipeline without the option (a per-micro-batch mean differs
  from the whole batch's, so not the single-device step)."""
  import flax.linen as nn
  from pipeline_models import _state, _step, _mse

  class Centred(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(32)(x))
      alpa_py.mark_pipeline_boundary()
      x = nn.Dense(32)(x)
      x = x - x.mean(0, keepdims=True)
      return nn.Dense(8)(nn.relu(x))

  def make():
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    b = {"x": jax.random.normal(kx, (32, 16)),
         "y": jax.random.normal(ky, (32, 8))}
    return _state(Centred(), b["x"]), b, _step(_mse)

  ex = _pipeline_data_parallel(
      make, reference=_pipeline(make()[2], force_data_parallel=False))
  notes = [s.gradient_reduction for s in ex.plan.stages]
  assert notes[0].startswith("once per step"), notes
  assert notes[1].startswith("per micro-batch (") and "batch" in notes[1], \
      notes


def test_a_heavy_op_no_strategy_can_split_is_named():
  def f(x, w):
    return jax.numpy.tanh(x @ w)

  x, w = np.ones((3, 5), np.float32), np.ones((5, 7), np.float32)
  method = alpa_py.ShardParallel(devices=jax.devices()[:4], mesh_shape=(4,))
  with pytest.raises(alpa_py.InfeasiblePlanError,
                     match=r"dot_general #\d+ .*allow_recompute_heavy_op=True"):
    alpa_py.parallelize(f, method=method, batch_argnums=())(x, w)
  opt = alpa_py.AutoShardingOption(allow_recompute_heavy_op=True)
  out = alpa_py.parallelize(f, method=dataclasses.replace(
      method, auto_sharding_option=opt), batch_argnums=())(x, w)
  np.testing.assert_allclose(out, f(x, w), rtol=1e-6)


def test_heavy_ops_are_split_over_every_device_by_default():
  _, _, _, _, ex = _compile("encoder", alpa_py.ShardParallel, (2, 2))
  for op in ex.plan.ops:
    axes = {c for part in op.strategy.split("+")[0].split(",")
            for c in part.partition(":S")[2]}
    assert axes == {"0", "1"}, op


@pytest.mark.parametrize("costs, match", [
    (((1e-6, 1e-10),), r"1 pair\(s\) but mesh_shape \(2, 4\) has 2 axes"),
    (((1e-6, 1e-10), (1e-6, -1.0)), "non-negative"),
])
def test_mesh_link_costs_are_checked(costs, match):
  with pytest.raises(ValueError, match=match):
    alpa_py.ShardParallel(mesh_shape=(2, 4), mesh_link_costs=costs)
  with pytest.raises(ValueError, match="needs mesh_shape"):
    alpa_py.ShardParallel(mesh_link_costs=((1e-6, 1e-10),))


def test_mesh_link_costs_change_the_price_of_an_axis():
  from alpa_py.driver.analysis import StepAnalysis
  state, batch, step = MODELS["mlp"]()
  analysis = StepAnalysis(step, (state, batch), num_devices=8)
  fast = alpa_py.ShardParallel(mesh_shape=(2, 4), mesh_link_costs=(
      (1e-7, 1e-12), (1e-7, 1e-12)))
  slow = dataclasses.replace(fast, mesh_link_costs=((1e-3, 1e-8), (1e-7, 1e-12)))
  assert analysis.solve_method(slow, PROFILE).objective > \
      analysis.solve_method(fast, PROFILE).objective


def test_options_are_validated_and_in_the_cache_key():
  with pytest.raises(ValueError, match="force_batch_dim_to_mesh_dim"):
    alpa_py.AutoShardingOption(force_batch_dim_to_mesh_dim=2)
  with pytest.raises(TypeError, match="allow_recompute_heavy_op"):
    alpa_py.AutoShardingOption(allow_recompute_heavy_op=1)
  with pytest.raises(ValueError, match="all_gather_threshold"):
    alpa_py.AutoShardingOption(force_zero_stage_3_all_gather_threshold=-1)
  state, batch, step = MODELS["mlp"]()
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      devices=jax.devices()[:4], auto_sharding_option=OPT))
  ex = par.get_executable(state, batch)
  par.method = alpa_py.ShardParallel(
      devices=jax.devices()[:4], auto_sharding_option=dataclasses.replace(
          OPT, allow_recompute_heavy_op=True))
  assert par.get_executable(state, batch) is not ex


def test_executable_is_callable_and_dumps_without_recompiling(tmp_path,
                                                              monkeypatch):
  state, batch, step, par, ex = _compile("mlp", alpa_py.DataParallel, (4,))
  ref_state, ref_loss = jax.jit(step)(state, batch)
  _, loss = ex(state, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  with pytest.raises(TypeError, match=r"compiled for other arguments: .*"
                     r"arg1\['x'\] is float32\[32, 128\], compiled for "
                     r"float32\[64, 128\]"):
    ex(state, {"x": batch["x"][:32], "y": batch["y"][:32]})
  import alpa_py.driver as driver
  calls = []
  monkeypatch.setattr(driver, "compile_step",
                      lambda *a: calls.append(a) or pytest.fail("recompiled"))
  assert par.get_executable(state, batch, dump_dir=str(tmp_path)) is ex
  assert "ShardingPlan(DataParallel)" in (tmp_path / "plan.txt").read_text()
  assert "all-reduce" in (tmp_path / "step.hlo.txt").read_text()
  assert calls == []


@pytest.mark.parametrize("mesh", [(4,), (1, 4)])
def test_shard_parallel_finds_megatron_on_a_bert_layer(mesh):
  """hidden 1024, 4 heads, 2,048 tokens: query/key/value and fc1 split by
  column, attention by head, proj and fc2 by row with one reduction each
  (an all-reduce, or Megatron-SP's reduce-scatter) in the forward pass."""
  from alpa_py.compiler.hlo_stats import collectives
  state, batch, step = MODELS["encoder"](batch=8, seq=256, hidden=1024)
  method = alpa_py.ShardParallel(devices=jax.devices()[:4], mesh_shape=mesh,
                                 auto_sharding_option=OPT)
  par = alpa_py.parallelize(step, method=method)
  ex = par.get_executable(state, batch)
  fwd = ex.plan.ops[:8]  # query, key, value, 2 attention einsums, proj, fc1, fc2
  kinds = [o.strategy.split(":")[0][0] for o in fwd]
  assert kinds == ["j", "j", "j", "b", "b", "k", "j", "k"], \
      [o.strategy for o in fwd]
  for row in (fwd[5], fwd[7]):
    assert "+AR" in row.strategy or "+RS" in row.strategy
  last_forward = fwd[-1].index
  reductions = [c for c in collectives(ex.hlo_text())
                if c.graph_op is not None and c.graph_op <= last_forward
                and set(c.kinds) & {"all-reduce", "reduce-scatter"}]
  assert len(reductions) == 2, reductions
  assert dict(ex.plan.predicted_collectives) == dict(
      ex.plan.compiled_collectives)
  _same_as_single_device(state, batch, step, par)


def test_shard_parallel_on_2x2_is_megatron_inside_data_parallel_as_predicted():
  """On a (2, 2) mesh the same BERT layer is data parallel over one axis and
  Megatron over the other (query/key/value and fc1 split by column, proj and
  fc2 by row with an all-reduce), and the collectives XLA compiles are the
  ones the plan predicts (a bias gradient all-reduced over one axis rather
  than reduce-scattered over both and gathered again)."""
  state, batch, step = MODELS["encoder"](batch=8, seq=256, hidden=1024)
  method = alpa_py.ShardParallel(devices=jax.devices()[:4], mesh_shape=(2, 2),
                                 auto_sharding_option=OPT)
  par = alpa_py.parallelize(step, method=method)
  with warnings.catch_warnings():
    warnings.simplefilter("error", alpa_py.PlanMismatchWarning)
    ex = par.get_executable(state, batch)
  fwd = ex.plan.ops[:8]
  # both axes of the (2, 2) mesh are alike (one node): Megatron takes either
  # one, data parallelism the other, the same for every layer op
  m = 1 if "j0:S1" in fwd[0].strategy else 0
  for o in (fwd[0], fwd[1], fwd[2], fwd[6]):  # column parallel on axis m
    assert f"j0:S{m}" in o.strategy and f"i0:S{1 - m}" in o.strategy, o
  for o in (fwd[5], fwd[7]):  # row parallel on axis m, reduced
    assert f"k0:S{m}+AR" in o.strategy, o
  assert dict(ex.plan.predicted_collectives) == dict(
      ex.plan.compiled_collectives)
  _same_as_single_device(state, batch, step, par)
