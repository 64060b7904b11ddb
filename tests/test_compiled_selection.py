"""Choosing among compiled programs by the profile's price of each
(``AutoShardingOption.select_by_compiled_cost``) and by timing the cheapest
(``measure_candidates``)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.cluster_env import CostProfile
from alpa_py.compiler.cost_features import FEATURES, INDEX
from alpa_py.compiler.cost_model import DeviceKey, LinearCostModel
from alpa_py.compiler.program_cost import price_program
from alpa_py.driver import compiled_selection


def _profile(collective_scale=1.0):
  coef = np.zeros(len(FEATURES))
  coef[INDEX["fixed"]] = 1e-4
  coef[INDEX["matmul_flops"]] = 1e-10
  coef[INDEX["nonmatmul_bytes"]] = 1e-9
  coef[INDEX["kernel_launches"]] = 1e-5
  for j, name in enumerate(FEATURES):
    if name.endswith(":bytes"):
      coef[j] = 1e-9 * collective_scale
    elif name.endswith(":count"):
      coef[j] = 5e-5 * collective_scale
  model = LinearCostModel(key=DeviceKey.of(jax.devices()),
                          coefficients=tuple(coef))
  return CostProfile.from_model(model, "test:calibrated")


def _step(params, x, y):
  def loss(p):
    h = jnp.tanh(x @ p["w1"])
    return jnp.mean((h @ p["w2"] - y) ** 2)
  g = jax.grad(loss)(params)
  return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), loss(params)


def _args():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(k[0], (64, 256)) * 0.1,
            "w2": jax.random.normal(k[1], (256, 32)) * 0.1}
  return (params, jax.random.normal(k[2], (64, 64)),
          jax.random.normal(k[3], (64, 32)))


def _compile(**option):
  opt = alpa_py.AutoShardingOption(**option)
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*_args())
  return f, ex


@pytest.mark.parametrize("collective_scale", [1.0, 1e3])
def test_the_cheapest_compiled_program_is_kept_and_equals_jit(collective_scale):
  profile = _profile(collective_scale)
  f, ex = _compile(cost_profile=profile, measure_candidates=0)
  plan = ex.plan
  names = [n for n, _ in plan.alternatives]
  assert {"data-parallel", "zero2", "zero3"} <= set(names)
  assert sum(n.startswith("ilp (") for n in names) == 1
  assert any(n.startswith("ilp batch-split (") for n in names)
  assert any(n.startswith("ilp batch-split propagated (") for n in names)
  # on each 2-D mesh ((2, 4) and (4, 2) for 8 devices)
  assert sorted(n for n in names if n.startswith("tensor-parallel")) == [
      "tensor-parallel (2, 4)", "tensor-parallel (4, 2)"]
  prices = [s for _, s in plan.alternatives]
  assert prices == sorted(prices) and plan.measured == ()
  assert plan.compiled_step_seconds == prices[0]
  assert price_program(ex.hlo_text(), profile).seconds == pytest.approx(
      plan.compiled_step_seconds)
  assert "chosen by compiled price" in str(plan)
  args = _args()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    out = f(*args)
  ref = jax.jit(_step)(*args)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_off_by_default_for_a_rate_profile_and_when_asked():
  _, ex = _compile()  # the "cpu" profile: no fitted model
  assert ex.plan.alternatives == () and ex.plan.compiled_step_seconds is None
  _, ex = _compile(cost_profile=_profile(), select_by_compiled_cost=False)
  assert ex.plan.alternatives == ()


def test_a_named_mesh_is_not_second_guessed():
  opt = alpa_py.AutoShardingOption(cost_profile=_profile())
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      mesh_shape=(2, 4), auto_sharding_option=opt))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*_args())
  assert ex.plan.alternatives == () and tuple(ex.plan.mesh_shape) == (2, 4)


def test_a_bad_value_is_refused():
  with pytest.raises(TypeError, match="select_by_compiled_cost"):
    alpa_py.AutoShardingOption(select_by_compiled_cost="yes")


def test_candidates_that_cannot_split_the_batch_are_skipped():
  # a batch of 4 rows: no 8-way data-parallel candidate applies; the ILP's
  # own plan stands, alone
  params, x, y = _args()
  x, y = x[:4], y[:4]
  opt = alpa_py.AutoShardingOption(cost_profile=_profile())
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt), batch_argnums=(1, 2))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(params, x, y)
    out = f(params, x, y)
  names = [n for n, _ in ex.plan.alternatives]
  assert names and names[0].startswith("ilp (")
  assert not {"data-parallel", "zero2", "zero3"} & set(names)
  ref = jax.jit(_step)(params, x, y)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_every_candidate_computes_what_jit_computes(monkeypatch):
  compiled = []
  real = compiled_selection._compile

  def keep(compile_config, name, cfg, profile):
    got = real(compile_config, name, cfg, profile)
    if isinstance(got, tuple):
      compiled.append((got[1], cfg.propagate, got[2]))
    return got

  monkeypatch.setattr(compiled_selection, "_compile", keep)
  _compile(cost_profile=_profile(), measure_candidates=0)
  assert any(p for _, p, _ in compiled) and any(not p for _, p, _ in compiled)
  args = _args()
  ref = jax.tree.leaves(jax.jit(_step)(*args))
  for name, propagated, step in compiled:
    assert step.plan.propagated == propagated, name
    if propagated:  # nothing promised op by op: nothing to mismatch
      assert step.plan.predicted_collectives == () and \
          not step.plan.collective_mismatch
    flat = [jax.device_put(x, s) for x, s in
            zip(jax.tree.leaves(args), step.task.in_shardings)]
    out = step.task.compiled(*flat)
    for a, b in zip(jax.tree.leaves(out), ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_tensor_parallel_candidate_splits_every_weight_on_the_last_axis(
    monkeypatch):
  compiled = {}
  real = compiled_selection._compile

  def keep(compile_config, name, cfg, profile):
    got = real(compile_config, name, cfg, profile)
    if isinstance(got, tuple):
      compiled[got[1]] = got[2]
    return got

  monkeypatch.setattr(compiled_selection, "_compile", keep)
  _compile(cost_profile=_profile(), measure_candidates=0)
  step = compiled["tensor-parallel (2, 4)"]
  w1, w2, x, y = step.task.in_shardings
  for w in (w1, w2):  # split 4 ways on axis "y", the dim the ILP chose
    assert sorted(a for e in w.spec if e for a in
                  (e if isinstance(e, tuple) else (e,))) == ["y"], w.spec
  # the batch on axis 0 only
  assert tuple(x.spec)[0] in ("x", ("x",)) and tuple(y.spec)[0] in (
      "x", ("x",))
  # Megatron's pairing for an MLP: w1 by columns, w2 by rows, so the
  # hidden activation never moves
  assert tuple(w1.spec)[-1] in ("y", ("y",)) and tuple(w2.spec)[0] in (
      "y", ("y",))


def test_tensor_parallel_layout_needs_a_2d_mesh():
  from alpa_py.driver.layout import input_specs
  from alpa_py.driver.signature import make_signature
  from alpa_py.methods import InputLayout
  sig, _ = make_signature(_args(), static=(), batch=(1, 2), donate=(),
                          devices=tuple(jax.devices()))
  with pytest.raises(ValueError, match="2-D mesh"):
    input_specs(InputLayout.TENSOR_PARALLEL, sig, (8,))


def test_the_cheapest_are_timed_on_copies_and_the_fastest_kept():
  opt = alpa_py.AutoShardingOption(cost_profile=_profile(),
                                   measure_candidates=2)
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt), donate_argnums=(0,))
  # the parameters already replicated over the devices: a data-parallel
  # candidate's layout, so an aliasing placement would donate them
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  args = jax.device_put(_args(), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  before = jax.tree.map(np.asarray, args)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*args)
  plan = ex.plan
  assert len(plan.measured) == 2
  cheapest = [n for n, _ in plan.alternatives[:2]]
  assert sorted(n for n, _ in plan.measured) == sorted(cheapest)
  times = [s for _, s in plan.measured]
  assert times == sorted(times) and all(t > 0 for t in times)
  # the kept program is the fastest measured one, and is priced as such
  assert plan.compiled_step_seconds == dict(plan.alternatives)[
      plan.measured[0][0]]
  assert "fastest measured" in str(plan)
  # timing neither donated nor changed the caller's arrays
  for a, b in zip(jax.tree.leaves(args), jax.tree.leaves(before)):
    assert not a.is_deleted()
    np.testing.assert_array_equal(np.asarray(a), b)
  ref = jax.jit(_step)(*args)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    out = f(*args)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_abstract_arguments_are_chosen_by_price():
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      _args())
  opt = alpa_py.AutoShardingOption(cost_profile=_profile())
  f = alpa_py.parallelize(_step, method=alpa_py.ShardParallel(
      auto_sharding_option=opt))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    ex = f.get_executable(*args)
  assert ex.plan.measured == () and ex.plan.alternatives
  assert ex.plan.compiled_step_seconds == ex.plan.alternatives[0][1]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_measure_count_is_refused(bad):
  with pytest.raises(ValueError, match="measure_candidates"):
    alpa_py.AutoShardingOption(measure_candidates=bad)


def test_timing_never_donates_the_callers_buffers():
  import types
  from alpa_py.driver import candidate_timing
  x = jax.device_put(jnp.arange(8.0), jax.devices()[0])
  s = x.sharding
  compiled = jax.jit(lambda a: a * 2, in_shardings=s, out_shardings=s,
                     donate_argnums=0).lower(x).compile()
  task = types.SimpleNamespace(compiled=compiled, in_shardings=(s,))
  times = candidate_timing.time_tasks({"a": task, "b": task}, [x], [0],
                                     rounds=3)
  assert set(times) == {"a", "b"}
  assert all(len(ts) == 3 and min(ts) > 0 for ts in times.values())
  assert not x.is_deleted()
  np.testing.assert_array_equal(np.asarray(x), np.arange(8.0))


def test_every_candidate_is_timed_unless_a_count_is_given():
  import types
  cfg = lambda m: types.SimpleNamespace(  # noqa: E731
      option=alpa_py.AutoShardingOption(measure_candidates=m))
  assert compiled_selection.measured_count(cfg(None), 8) == 8
  assert compiled_selection.measured_count(cfg(2), 8) == 2
  assert compiled_selection.measured_count(cfg(20), 8) == 8
  assert compiled_selection.measured_count(cfg(0), 8) == 0


def test_a_near_tie_is_raced_in_narrowing_stages_on_pooled_samples(
    monkeypatch):
  from alpa_py.driver import candidate_timing
  calls = []
  # the first rounds put b 15% behind a (a slow spell); pooled with the
  # race's rounds, b is the faster, and c (30% behind) is never raced
  stages = [{"a": [1.0] * 5, "b": [1.15] * 5, "c": [1.3] * 5, "d": [1.1] * 5},
            {"a": [1.0] * 10, "b": [0.97] * 10, "d": [1.2] * 10},
            {"a": [1.0] * 10, "b": [0.9] * 10}]

  def fake(tasks, leaves, donated, rounds=5, seed=0):
    calls.append((sorted(tasks), rounds))
    return {n: list(ts) for n, ts in stages[len(calls) - 1].items()}
  monkeypatch.setattr(candidate_timing, "time_tasks", fake)
  got = candidate_timing.race({n: 0 for n in "abcd"}, [], [])
  assert calls == [(["a", "b", "c", "d"], 5), (["a", "b", "d"], 10),
                   (["a", "b"], 10)]
  assert got == {"a": 1.0, "b": 0.97, "c": 1.3, "d": 1.2}
  assert min(got, key=got.get) == "b"


def test_a_clear_winner_is_not_raced(monkeypatch):
  from alpa_py.driver import candidate_timing
  calls = []

  def fake(tasks, leaves, donated, rounds=5, seed=0):
    calls.append(sorted(tasks))
    return {"a": [1.0] * rounds, "b": [1.5] * rounds}
  monkeypatch.setattr(candidate_timing, "time_tasks", fake)
  assert candidate_timing.race({"a": 0, "b": 0}, [], []) == \
      {"a": 1.0, "b": 1.5}
  assert calls == [["a", "b"]]


def _compiled_candidates(monkeypatch, prices=None, **option):
  """(name -> (config, CompiledStep)) of every candidate compiled (and
  name -> price in ``prices``, if given)."""
  compiled = {}
  real = compiled_selection._compile

  def keep(compile_config, name, cfg, profile):
    got = real(compile_config, name, cfg, profile)
    if isinstance(got, tuple):
      compiled[got[1]] = (cfg, got[2])
      if prices is not None:
        prices[got[1]] = got[0]
    return got

  monkeypatch.setattr(compiled_selection, "_compile", keep)
  _compile(cost_profile=_profile(), measure_candidates=0, **option)
  return compiled


def _split(sharding) -> bool:
  return any(e for e in sharding.spec)


def test_each_layout_candidate_is_its_own_plan(monkeypatch):
  # ZeRO-2 and ZeRO-3 share their pass options: each is still solved under
  # its own input layouts (a memo keyed by the options alone handed ZeRO-3
  # ZeRO-2's plan, and the tensor-parallel candidates the batch-split ILP's)
  compiled = _compiled_candidates(monkeypatch)
  z2 = compiled["zero2"][1].task.in_shardings
  z3 = compiled["zero3"][1].task.in_shardings
  assert not _split(z2[0]) and not _split(z2[1])  # parameters replicated
  assert _split(z3[0]) and _split(z3[1])  # parameters sharded
  for name in ("tensor-parallel (2, 4)", "tensor-parallel (4, 2)"):
    cfg, step = compiled[name]
    assert step.plan.method.endswith("[tensor-parallel]"), name


def test_the_runner_up_rules_out_the_heaviest_layouts(monkeypatch):
  prices = {}
  compiled = _compiled_candidates(monkeypatch, prices)
  # the runner-up follows the pinned batch-split candidate priced cheapest
  pinned = [n for n in compiled if n.startswith("ilp batch-split (")]
  assert len(pinned) > 1, list(compiled)
  first = min(pinned, key=prices.get)
  ups = [n for n in compiled if n.startswith(("ilp runner-up",
                                              "ilp heavy-split"))]
  assert len(ups) == 3, list(compiled)
  base = compiled[first][1].task.in_shardings
  mesh = compiled[first][1].plan.mesh_shape
  for name in ups:
    cfg, step = compiled[name]
    assert cfg.runner_up_of is compiled[first][1].planned.solution
    assert step.plan.mesh_shape == mesh and name.endswith(f"{tuple(mesh)}")
    got = step.task.in_shardings
    # w1 (64 x 256) and w2 (256 x 32, half w1's bytes) are the heaviest
    for i in (0, 1):
      assert got[i].spec != base[i].spec, (name, i, got[i].spec)
    # the batch stays on mesh axis 0
    assert got[2].spec == base[2].spec


def test_runner_up_exclusions_take_the_heaviest_non_batch_inputs():
  from types import SimpleNamespace
  from alpa_py.driver.layout import light_replicated, runner_up_exclusions
  shapes = {0: (64, 256), 1: (256, 32), 2: (16, 16), 3: (64, 64)}
  graph = SimpleNamespace(
      invars=(0, 1, 2, 3),
      tensor=lambda t: SimpleNamespace(shape=shapes[t],
                                       nbytes=4 * np.prod(shapes[t])))
  sig = SimpleNamespace(batch_inputs=frozenset({3}))
  sol = SimpleNamespace(spec_of={0: ((), (0,)), 1: ((0,), ()),
                                 2: ((), ()), 3: ((0,), ())})
  assert runner_up_exclusions(graph, sig, sol) == {0: ((), (0,)),
                                                   1: ((0,), ())}
  # the heavy-split candidate keeps the rest of the parameters whole
  assert light_replicated(graph, sig) == {2: [((), ())]}
