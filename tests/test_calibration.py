"""The calibrated cost model: active selection, features from HLO, the
profile cache, and a calibrated profile driving the intra-op pass."""

import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import alpa_py
from alpa_py.compiler import active_regression as ar
from alpa_py.compiler import calibration, calibration_pool, cluster_env
from alpa_py.compiler import hlo_stats
from alpa_py.compiler.cost_features import (FEATURES, INDEX, group_members,
                                            link_of)
from alpa_py.compiler.cost_model import DeviceKey, LinearCostModel


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("ALPA_PY_CACHE_DIR", str(tmp_path))
  cluster_env._calibrated_profile.cache_clear()
  yield tmp_path
  cluster_env._calibrated_profile.cache_clear()


# -- active selection on a synthetic design ---------------------------------

def _collinear_design(n=300, seed=0):
  """Four strongly collinear columns (a constant, and work that grows with
  one size) and six rare ones (8 rows each), as collectives of one kind and
  link are in a pool of programs."""
  rng = np.random.default_rng(seed)
  s = rng.lognormal(0.0, 1.0, n)
  x = np.zeros((n, 10))
  x[:, 0] = 1.0
  x[:, 1] = s ** 1.2 * (1 + 0.05 * rng.standard_normal(n))
  x[:, 2] = s * (1 + 0.05 * rng.standard_normal(n))
  x[:, 3] = np.round(1 + 2 * s)
  for j in range(4, 10):
    rows = rng.choice(n, 8, replace=False)
    x[rows, j] = rng.uniform(0.5, 2.0, 8) * s[rows]
  beta = np.array([0.5, 1.0, 0.8, 0.3, 2.0, 3.0, 1.5, 2.5, 4.0, 1.0])
  y = x @ beta * (1 + 0.01 * rng.standard_normal(n))
  return x, y, beta


def test_orthonormal_basis_spans_a_collinear_design():
  x, _, _ = _collinear_design()
  x = np.hstack([x, x[:, :1] + 2 * x[:, 2:3]])  # an exactly dependent column
  q = ar.orthonormal_basis(x)
  assert q.shape == (300, 10)
  np.testing.assert_allclose(q.T @ q, np.eye(10), atol=1e-10)
  np.testing.assert_allclose(ar.leverage_scores(x).sum(), 10, rtol=1e-9)


@pytest.mark.parametrize("rule", ["bss", "leverage"])
def test_active_selection_recovers_the_model_with_few_labels(rule):
  x, y, beta = _collinear_design()
  prior = x.sum(axis=1)  # rows weighted for relative error
  a, t = x / prior[:, None], y / prior
  full = np.mean(np.abs(x @ ar.fit(a, t) - y) / y)

  def errors(rule, m):
    out = []
    for seed in range(10):
      sel = ar.select(rule, a, m, np.random.default_rng(seed))
      assert len(sel.indices) == m == len(set(sel.indices.tolist()))
      coef = ar.fit(a[sel.indices], t[sel.indices], sel.weights)
      out.append((np.mean(np.abs(x @ coef - y) / y),
                  np.linalg.norm(coef - beta) / np.linalg.norm(beta)))
    return np.array(out)

  active, uniform = errors(rule, 30), errors("uniform", 30)
  # 3 labels per coefficient (30 of 300): about the full fit's error, and a
  # third of uniform sampling's (which misses the rare columns)
  assert np.median(active[:, 0]) < 1.5 * full
  assert 3 * np.median(active[:, 0]) < np.median(uniform[:, 0])
  assert np.median(active[:, 1]) < 0.1
  assert np.median(active[:, 1]) < np.median(uniform[:, 1]) / 3


def test_least_absolute_deviations_ignores_an_outlier():
  x, y, beta = _collinear_design()
  y = y.copy()
  y[np.argmax(x[:, 1])] *= 30  # one profile slowed down by another process
  l2 = ar.fit(x, y)
  l1 = ar.fit(x, y, loss="l1")
  assert np.linalg.norm(l1 - beta) < 0.2 * np.linalg.norm(l2 - beta)


def test_leverage_inclusion_probabilities_sum_to_the_budget():
  p = ar.inclusion_probabilities(np.array([5.0, 1, 1, 1, 1, 0.1]), 3)
  np.testing.assert_allclose(p.sum(), 3)
  assert p[0] == 1 and (p <= 1).all()


def test_fit_coefficients_recovers_rates_relative_to_the_prior():
  rng = np.random.default_rng(3)
  true = np.zeros(len(FEATURES))
  true[INDEX["fixed"]] = 1e-4
  true[INDEX["matmul_flops"]] = 8e-11
  true[INDEX["nonmatmul_bytes"]] = 7e-10
  true[INDEX["all-gather:inner:count"]] = 6e-5
  x = np.zeros((40, len(FEATURES)))
  x[:, INDEX["fixed"]] = 1
  x[:, INDEX["matmul_flops"]] = rng.uniform(1e6, 1e10, 40)  # 4 orders apart
  x[:, INDEX["nonmatmul_bytes"]] = rng.uniform(1e4, 1e8, 40)
  x[::2, INDEX["all-gather:inner:count"]] = rng.integers(1, 20, 20)
  y = x @ true
  coef, filled = calibration.fit_coefficients(x, y, np.ones(40), "cpu")
  for f in ("fixed", "matmul_flops", "nonmatmul_bytes",
            "all-gather:inner:count"):
    np.testing.assert_allclose(coef[INDEX[f]], true[INDEX[f]], rtol=1e-6)
  # features no row exercised are filled, never left free
  assert "all-gather:outer:count" in filled and "fixed" not in filled
  assert coef[INDEX["all-gather:outer:count"]] >= 6e-5 * (1 - 1e-6)
  # the fit is relative: the shortest program is priced as well as the longest
  pred = x @ coef
  assert np.max(np.abs(pred - y) / y) < 1e-6


# -- features of compiled programs -------------------------------------------

@pytest.mark.parametrize("text,groups,link", [
    ("[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]], "inner"),
    ("[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]], "outer"),
    ("{{0,4},{1,5},{2,6},{3,7}}", [[0, 4], [1, 5], [2, 6], [3, 7]], "outer"),
    ("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}",
     [[0, 4], [1, 5], [2, 6], [3, 7]], "outer"),
    ("mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) "
     "{'axis_1'}", [[0, 1, 2, 3], [4, 5, 6, 7]], "inner"),
    ("", [list(range(8))], "inner"),
])
def test_replica_groups_are_read_in_every_format(text, groups, link):
  assert group_members(text, 8) == groups
  assert link_of(groups[0]) == link


def _candidate(cid):
  return next(c for c in calibration_pool.all_candidates(8) if c.id == cid)


def test_features_describe_the_compiled_program():
  devices = jax.devices()
  # K split over the 8 devices: per-device FLOPs, partial sums all-reduced
  c = calibration_pool.compile_candidate(
      _candidate("dot:512x128x512:(1, 8):K:y+AR"), devices)
  f = c.features
  assert f[INDEX["fixed"]] == 1
  assert f[INDEX["matmul_flops"]] == 2 * 512 * 16 * 512
  assert hlo_stats.collective_counts(c.executable.as_text())["all-reduce"] == 1
  assert f[INDEX["all-reduce:inner:count"]] == 1
  # ring bytes: 2 (n - 1) / n of the 512 x 512 partial sums
  assert f[INDEX["all-reduce:inner:bytes"]] == 2 * 7 / 8 * 512 * 512 * 4
  # a reduce-scatter over x (2 devices, strided ids): the outer link
  c = calibration_pool.compile_candidate(
      _candidate("coll:psum_scatter:128x128:(2, 4):x"), devices)
  assert c.features[INDEX["reduce-scatter:outer:count"]] == 1
  # of the (128, 128) operand on each device
  assert c.features[INDEX["reduce-scatter:outer:bytes"]] == 0.5 * 128 * 128 * 4
  # every collective the counter sees is in exactly one feature
  c = calibration_pool.compile_candidate(
      _candidate("mlp:64x128:(2, 4):megatron"), devices)
  counts = hlo_stats.collective_counts(c.executable.as_text())
  feature_counts = sum(c.features[i] for i, n in enumerate(FEATURES)
                       if n.endswith(":count"))
  assert feature_counts == sum(counts.values()) > 0
  assert c.features[INDEX["kernel_launches"]] > 1


def test_the_pool_is_a_fixed_draw_of_every_family():
  pool = calibration_pool.candidate_pool(8, 240, seed=0)
  assert len(pool) == 240 == len({c.id for c in pool})
  assert {c.family for c in pool} == {"dot", "ew", "reduce", "collective",
                                      "mlp", "attn", "conv", "step"}
  assert [c.id for c in pool] == [c.id for c in
                                  calibration_pool.candidate_pool(8, 240, 0)]


# -- bad input ------------------------------------------------------------------

def test_a_budget_below_the_minimum_names_the_minimum():
  low = calibration.minimum_budget()
  assert low == len(FEATURES)
  with pytest.raises(ValueError, match=rf"below the minimum \(={low}\)"):
    alpa_py.calibrate(budget=5)
  with pytest.raises(ValueError, match="larger than the pool"):
    alpa_py.calibrate(budget=50, pool_size=40)
  with pytest.raises(ValueError, match="selection"):
    alpa_py.calibrate(budget=30, selection="random")


def test_cost_profile_option_accepts_profiles_and_calibrated_names():
  alpa_py.AutoShardingOption(cost_profile="cpu:calibrated")
  with pytest.raises(ValueError, match="cost_profile"):
    alpa_py.AutoShardingOption(cost_profile="cpu:tuned")


# -- the cache ------------------------------------------------------------------

def _model(key=None, scale=1.0):
  key = key or DeviceKey.of(jax.devices())
  coef = np.full(len(FEATURES), 1e-6) * scale
  return LinearCostModel(key=key, coefficients=tuple(coef), budget=22,
                         pool_size=30, selection="bss",
                         labels=(("dot:x", 0.001),))


@pytest.fixture
def no_profiling(monkeypatch):
  """calibrate_model replaced by a stub that records its calls."""
  calls = []

  def stub(devices=None, budget=calibration.DEFAULT_BUDGET, **kw):
    calls.append(budget)
    return _model(scale=2.0)

  monkeypatch.setattr(calibration, "calibrate_model", stub)
  return calls


def test_the_cache_round_trips(cache_dir):
  model = _model()
  path = calibration.save(model)
  assert path.parent == cache_dir
  assert calibration.load(model.key) == model


def test_a_cache_from_another_version_is_profiled_again(cache_dir, caplog,
                                                        no_profiling):
  key = DeviceKey.of(jax.devices())
  old = DeviceKey(key.platform, key.device_kind, key.num_devices, "0.4.1",
                  key.jaxlib)
  calibration.save(_model(old))
  caplog.set_level(logging.INFO, logger="alpa_py")
  model = calibration.load_or_calibrate()
  assert no_profiling == [calibration.DEFAULT_BUDGET]
  assert model.key == key
  assert "jax 0.4.1" in caplog.text and "profiling again" in caplog.text
  assert calibration.load(key) == model  # the new one replaced it


def test_a_corrupt_cache_warns_and_is_profiled_again(cache_dir, no_profiling):
  key = DeviceKey.of(jax.devices())
  calibration.cache_path(key.platform, key.num_devices).write_text("{not json")
  with pytest.warns(alpa_py.CalibrationCacheWarning, match="unreadable"):
    calibration.load_or_calibrate()
  assert len(no_profiling) == 1
  # a record of another schema is unreadable too
  data = _model().to_json()
  data["features"] = data["features"][:-1]
  calibration.cache_path(key.platform, key.num_devices).write_text(
      json.dumps(data))
  with pytest.warns(alpa_py.CalibrationCacheWarning):
    calibration.load_or_calibrate()
  assert len(no_profiling) == 2


def test_cpu_calibrated_calibrates_on_first_use_then_reads_the_cache(
    cache_dir, no_profiling):
  first = cluster_env.get_profile("cpu:calibrated")
  assert no_profiling == [calibration.DEFAULT_BUDGET]
  assert first.model is not None and first.name == "cpu:calibrated"
  cluster_env._calibrated_profile.cache_clear()  # as a new process would
  again = cluster_env.get_profile("cpu:calibrated")
  assert len(no_profiling) == 1
  assert again == first
  with pytest.raises(ValueError, match="cpu:calibrated"):
    cluster_env.get_profile("gpu:calibrated")


# -- pricing --------------------------------------------------------------------

def test_a_calibrated_profile_prices_the_logical_mesh():
  model = _model()
  coef = np.zeros(len(FEATURES))
  coef[INDEX["matmul_flops"]] = 1e-10
  coef[INDEX["nonmatmul_bytes"]] = 1e-9
  coef[INDEX["all-reduce:inner:count"]] = 1e-5
  coef[INDEX["all-reduce:inner:bytes"]] = 2e-9
  coef[INDEX["all-gather:outer:count"]] = 3e-5
  model = LinearCostModel(key=model.key, coefficients=tuple(coef))
  mesh = cluster_env.LogicalMesh((2, 4), cluster_env.CostProfile.from_model(
      model))
  assert mesh.link(0) == "outer" and mesh.link(1) == "inner"
  np.testing.assert_allclose(mesh.compute(1e9, 0, True), 0.1)
  np.testing.assert_allclose(mesh.compute(0, 1e6, False), 1e-3)
  np.testing.assert_allclose(mesh.all_reduce(4e6, 1),
                             1e-5 + 2e-9 * 2 * 3 / 4 * 4e6)
  np.testing.assert_allclose(mesh.all_gather(4e6, 0), 3e-5)
  assert mesh.all_reduce(4e6, 0) == 0.0  # an outer all-reduce fitted free


def test_calibrate_gives_a_profile_the_intra_op_pass_uses(cache_dir):
  profile = alpa_py.calibrate(budget=calibration.minimum_budget(),
                              pool_size=30)
  assert isinstance(profile, alpa_py.CostProfile)
  assert profile.model.budget == calibration.minimum_budget()
  assert len(profile.model.labels) == profile.model.budget
  assert all(c >= 0 for c in profile.model.coefficients)
  # cached as cpu:calibrated
  assert cluster_env.get_profile("cpu:calibrated").model == profile.model

  def step(w, x):
    def loss(w):
      return jnp.mean(jnp.tanh(x @ w) ** 2)
    return w - 0.1 * jax.grad(loss)(w)

  w = jnp.full((64, 32), 0.01, jnp.float32)
  x = jnp.arange(128 * 64, dtype=jnp.float32).reshape(128, 64) / 1000
  opt = alpa_py.AutoShardingOption(cost_profile=profile)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", alpa_py.PlanMismatchWarning)
    f = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
        auto_sharding_option=opt))
    out = f(w, x)
  np.testing.assert_allclose(out, jax.jit(step)(w, x), rtol=1e-5, atol=1e-6)
  plan = f.get_executable(w, x).plan
  assert str(plan.cost_profile) == "cpu:calibrated"
  assert "profile cpu:calibrated" in str(plan)
