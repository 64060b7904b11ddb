"""Layer and stage DPs against brute force; schedules; pipeline input errors."""

import itertools
import math

import numpy as np
import pytest

import alpa_py
from alpa_py.compiler.layers import cluster_layers
from alpa_py.compiler.schedules import Schedule, clock_table
from alpa_py.compiler.stages import stage_brute_force, stage_dp
from pipeline_models import gpt_pipeline, mlp_pipeline


def _layer_brute_force(flops, cut, k, eps):
  n = len(flops)
  limit = (1 + eps) * sum(flops) / k * (1 + 1e-9)
  best = math.inf
  for cuts in itertools.combinations(range(1, n), k - 1):
    bounds = (0,) + cuts + (n,)
    if any(sum(flops[bounds[i]:bounds[i + 1]]) > limit for i in range(k)):
      continue
    best = min(best, max((cut[c - 1] for c in cuts), default=0.0))
  return best


@pytest.mark.parametrize("seed", range(20))
def test_layer_dp_is_optimal(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(4, 10))
  k = int(rng.integers(1, min(n, 5) + 1))
  flops = list(rng.uniform(1, 10, n))
  cut = list(rng.uniform(0, 100, n))
  eps = float(rng.choice([0.1, 0.5, 1.0]))
  best = _layer_brute_force(flops, cut, k, eps)
  if best == math.inf:
    with pytest.raises(ValueError, match="raise eps"):
      cluster_layers(flops, cut, k, eps)
    return
  starts = cluster_layers(flops, cut, k, eps)
  assert starts[0] == 0 and len(starts) == k
  got = max((cut[s - 1] for s in starts[1:]), default=0.0)
  assert got == pytest.approx(best)


@pytest.mark.parametrize("seed", range(20))
def test_stage_dp_is_optimal(seed):
  rng = np.random.default_rng(seed)
  L = int(rng.integers(1, 6))
  N = int(rng.choice([2, 4, 8]))
  sizes = [s for s in (1, 2, 4, 8) if s <= N]
  B = int(rng.integers(1, 9))
  table = {}
  for i in range(L):
    for j in range(i + 1, L + 1):
      for s in sizes:
        c = float(rng.uniform(0.5, 2.0)) * (j - i) / s ** float(rng.uniform(0.3, 1))
        table[(i, j, s)] = math.inf if rng.uniform() < 0.15 else c
  cost = lambda i, j, s: table[(i, j, s)]
  got, plan = stage_dp(L, N, sizes, cost, B)
  want, _ = stage_brute_force(L, N, sizes, cost, B)
  if want == math.inf:
    assert plan is None
    return
  assert got == pytest.approx(want)
  assert sum(s for _, _, s in plan) == N
  costs = [cost(*p) for p in plan]
  assert sum(costs) + (B - 1) * max(costs) == pytest.approx(want)


@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize("stages, micro", [(1, 1), (2, 4), (4, 8), (3, 2)])
def test_clock_tables_respect_dependencies(schedule, stages, micro):
  clocks = clock_table(schedule, stages, micro)
  when = {t: c for c, tasks in enumerate(clocks) for t in tasks}
  assert len(when) == 2 * stages * micro
  for (kind, s, m), c in when.items():
    if kind == "F" and s > 0:
      assert when[("F", s - 1, m)] < c
    if kind == "B":
      assert when[("F", s, m)] < c
      if s < stages - 1:
        assert when[("B", s + 1, m)] < c
  for tasks in clocks:  # one task per stage per clock
    assert len({s for _, s, _ in tasks}) == len(tasks)


def test_1f1b_in_flight_bound():
  K, B = 4, 8
  for sched, bound in ((Schedule.ONE_F_ONE_B, lambda s: K - s),
                       (Schedule.GPIPE, lambda s: B)):
    in_flight = [0] * K
    peak = [0] * K
    for tasks in clock_table(sched, K, B):
      for kind, s, _ in tasks:
        in_flight[s] += 1 if kind == "F" else -1
        peak[s] = max(peak[s], in_flight[s])
    assert peak == [bound(s) for s in range(K)]


def _pipe(**kw):
  return alpa_py.PipeshardParallel(**kw)


def test_micro_batches_must_divide_batch():
  state, batch, step = mlp_pipeline(batch=30)
  par = alpa_py.parallelize(step, method=_pipe(num_micro_batches=4))
  with pytest.raises(ValueError, match=r"num_micro_batches \(=4\) must divide"):
    par(state, batch)


def test_missing_markers():
  state, batch, step = mlp_pipeline(boundaries=False)
  par = alpa_py.parallelize(step, method=_pipe(num_micro_batches=2))
  with pytest.raises(ValueError, match="mark_pipeline_boundary"):
    par(state, batch)


def test_unbalanced_markers():
  import jax
  import jax.numpy as jnp

  def loss(w, batch):
    alpa_py.mark_pipeline_boundary()  # nothing before it
    h = jnp.tanh(batch["x"] @ w)
    alpa_py.mark_pipeline_boundary()
    return jnp.mean(h ** 2)

  def step(w, batch):
    l, g = alpa_py.value_and_grad(loss)(w, batch)
    return w - 0.1 * g, l

  w = jnp.ones((16, 16))
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (8, 16))}
  par = alpa_py.parallelize(step, method=_pipe(num_micro_batches=2))
  with pytest.raises(ValueError, match="unbalanced.*contain no operation"):
    par(w, batch)


def test_plain_jax_grad_is_rejected():
  import jax
  import jax.numpy as jnp

  def step(w, batch):
    return w - jax.grad(lambda v: jnp.sum(batch["x"] @ v))(w)

  par = alpa_py.parallelize(step, method=_pipe(num_micro_batches=1))
  with pytest.raises(ValueError, match="alpa_py.grad"):
    par(jnp.ones((4, 4)), {"x": jnp.ones((8, 4))})


def test_more_stages_than_devices():
  state, batch, step = gpt_pipeline(layers=4)
  method = _pipe(num_micro_batches=2, stage_option=alpa_py.ManualStageOption(
      ((0,), (1,), (2,), (3,)), ((1, 4),) * 4))
  with pytest.raises(ValueError, match="submesh_shapes .* hold 16 devices but 8"):
    alpa_py.parallelize(step, method=method)(state, batch)
  with pytest.raises(ValueError, match="more stages than there are devices"):
    alpa_py.parallelize(step, method=_pipe(
        stage_option=alpa_py.UniformStageOption(num_stages=16),
        layer_option=alpa_py.AutoLayerOption(16, eps=10.0)))(state, batch)


def test_stage_that_fits_no_submesh():
  state, batch, step = mlp_pipeline()
  opt = alpa_py.AutoShardingOption(memory_budget_per_device=1000)
  method = _pipe(num_micro_batches=2, default_auto_sharding_option=opt,
                 stage_option=alpa_py.UniformStageOption(num_stages=2))
  with pytest.raises(alpa_py.InfeasiblePlanError,
                     match=r"stage 0 .* fits no plan.*bytes per device"):
    alpa_py.parallelize(step, method=method)(state, batch)
  method = _pipe(num_micro_batches=2, default_auto_sharding_option=opt,
                 stage_option=alpa_py.AutoStageOption(cost_source="model"))
  with pytest.raises(alpa_py.InfeasiblePlanError, match="no stage"):
    alpa_py.parallelize(step, method=method)(state, batch)


@pytest.mark.parametrize("kwargs, match", [
    ({"pipeline_schedule": "zigzag"}, "pipeline_schedule"),
    ({"num_micro_batches": 0}, "num_micro_batches"),
    ({"stage_option": "auto"}, "stage_option"),
])
def test_bad_pipeshard_options(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    alpa_py.PipeshardParallel(**kwargs)
