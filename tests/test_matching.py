"""Online bipartite matching: greedy and primal-dual against brute force,
the offline optimum against exhaustive search, capacities never exceeded,
the sublinear structure against exact weights, and bad input."""

import itertools

import numpy as np
import pytest

from alpa_py import matching as mt


def _instance(seed, n=3, m=6, d=4):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32),
          rng.integers(1, 3, size=n),
          rng.normal(size=(m, d)).astype(np.float32))


def _brute_online(E, cap, A, pick):
  """The online rule written plainly: every weight, every open item."""
  left = cap.copy()
  out, value = [], 0.0
  for x in A:
    w = E @ x
    j = pick(w, left)
    out.append(j)
    if j >= 0:
      value += w[j]
      left[j] -= 1
  return np.array(out), value


def _brute_optimum(E, cap, A):
  w = A @ E.T
  best = 0.0
  for choice in itertools.product(range(-1, E.shape[0]), repeat=A.shape[0]):
    c = np.array(choice)
    if any((c == j).sum() > cap[j] for j in range(E.shape[0])):
      continue
    best = max(best, sum(w[i, j] for i, j in enumerate(c) if j >= 0))
  return best


@pytest.mark.parametrize("seed", range(6))
def test_greedy_and_optimum_against_brute_force(seed):
  E, cap, A = _instance(seed)

  def greedy_pick(w, left):
    w = np.where(left > 0, w, -np.inf)
    j = int(np.argmax(w))
    return j if w[j] > 0 else -1

  got = mt.greedy(E, cap, A)
  want, value = _brute_online(E, cap, A, greedy_pick)
  np.testing.assert_array_equal(got.assignment, want)
  assert got.value == pytest.approx(value, rel=1e-5)
  opt = mt.offline_optimum(E, cap, A)
  assert opt.value == pytest.approx(_brute_optimum(E, cap, A), rel=1e-4)
  for r in (got, opt, mt.primal_dual(E, cap, A)):
    assert np.all(r.load <= cap)  # capacity never exceeded
    assert r.value <= opt.value + 1e-4
    # the value re-derived from the assignment
    w = A @ E.T
    assert r.value == pytest.approx(
        sum(w[i, j] for i, j in enumerate(r.assignment) if j >= 0), rel=1e-5)
    assert r.unmatched == int((r.assignment < 0).sum())


@pytest.mark.parametrize("seed", range(4))
def test_primal_dual_against_brute_force(seed):
  E, cap, A = _instance(seed + 10)
  beta = np.zeros(E.shape[0])

  def pick(w, left):
    gain = np.where(left > 0, w - beta, -np.inf)
    j = int(np.argmax(gain))
    if gain[j] <= 0:
      return -1
    c = cap[j]
    beta[j] = beta[j] * (1 + 1 / c) + w[j] / (((1 + 1 / c) ** c - 1) * c)
    return j

  want, value = _brute_online(E, cap, A, pick)
  got = mt.primal_dual(E, cap, A, candidates=E.shape[0])
  np.testing.assert_array_equal(got.assignment, want)
  assert got.value == pytest.approx(value, rel=1e-5)


def test_adversarial_instance_and_bounds():
  items, cap, arrivals = mt.adversarial_instance(capacity=20)
  opt = mt.offline_optimum(items, cap, arrivals)
  g = mt.greedy(items, cap, arrivals)
  pd = mt.primal_dual(items, cap, arrivals)
  assert opt.value == pytest.approx(40, rel=1e-3)
  assert g.value / opt.value == pytest.approx(0.5, abs=0.01)
  assert g.value / opt.value >= mt.competitive_ratio_bound("greedy") - 1e-3
  assert pd.value > g.value  # the prices keep room for the second wave


def test_mips_equals_exact_when_probing_every_cluster():
  rng = np.random.default_rng(3)
  E = rng.normal(size=(400, 16)).astype(np.float32)
  A = rng.normal(size=(300, 16)).astype(np.float32)
  index = mt.ClusteredMIPS(E, probe=10 ** 6, num_clusters=20)
  exact = mt.greedy(E, 2, A)
  approx = mt.greedy(index, 2, A)
  np.testing.assert_array_equal(approx.assignment, exact.assignment)
  # probing one cluster on clustered data keeps nearly all the value
  centers = rng.normal(size=(20, 16)).astype(np.float32) * 3
  E2 = (centers[rng.integers(20, size=400)] +
        0.3 * rng.normal(size=(400, 16))).astype(np.float32)
  A2 = (centers[rng.integers(20, size=300)] +
        0.3 * rng.normal(size=(300, 16))).astype(np.float32)
  one = mt.greedy(E2, 2, A2, weights="mips", mips_options=dict(probe=1))
  assert one.value >= 0.95 * mt.greedy(E2, 2, A2).value
  assert np.all(one.load <= 2)


def test_mips_close_and_reopen_keep_the_open_set():
  """Random closes and reopens: probing every cluster returns the exact
  top-k among the open items; probe 1 returns only open items of the
  cluster whose centroid scores highest among clusters with open items."""
  rng = np.random.default_rng(5)
  E = rng.normal(size=(300, 8)).astype(np.float32)
  full = mt.ClusteredMIPS(E, probe=10 ** 6, num_clusters=12, seed=1)
  one = mt.ClusteredMIPS(E, probe=1, num_clusters=12, seed=1)
  is_open = np.ones(300, bool)
  for step in range(600):
    j = int(rng.integers(300))
    for index in (full, one):
      (index.close if is_open[j] else index.reopen)(j)
    is_open[j] = not is_open[j]
    if step % 3 == 0:  # closing or reopening twice changes nothing
      full.close(j) if not is_open[j] else full.reopen(j)
    x = rng.normal(size=8).astype(np.float32)
    ids, w = full.top(x, 5)
    want = np.flatnonzero(is_open)
    want = want[np.argsort(-(E[want] @ x), kind="stable")][:5]
    np.testing.assert_array_equal(np.sort(ids), np.sort(want))
    np.testing.assert_allclose(w, E[ids] @ x, rtol=1e-5, atol=1e-5)
    ids1, w1 = one.top(x, 3)
    assert is_open[ids1].all()
    if len(ids1):  # best: the first of top, as scalars
      assert one.best(x) == (ids1[0], w1[0])
    if is_open.any():
      live = [c for c in range(one.num_clusters)
              if is_open[one.cluster_of == c].any()]
      best = live[int(np.argmax(one.centers[live] @ x))]
      assert (one.cluster_of[ids1] == best).all() and len(ids1) >= 1
  exact = mt.ExactWeights(E)
  for j in range(300):
    full.close(j)
    one.close(j)
    if j < 299:
      exact.close(j)
  assert len(full.top(np.ones(8, np.float32), 3)[0]) == 0
  assert one.best(np.ones(8, np.float32)) == (-1, -np.inf)
  assert exact.best(np.ones(8, np.float32))[0] == 299
  exact.close(299)
  assert exact.best(np.ones(8, np.float32)) == (-1, -np.inf)


def test_arrivals_beyond_capacity_stay_unmatched_and_bad_input():
  E = np.eye(3, dtype=np.float32)
  A = np.ones((7, 3), np.float32)
  for f in (mt.greedy, mt.primal_dual):
    r = f(E, 2, A)
    assert r.unmatched == 1 and r.assignment[-1] == -1
    assert list(r.load) == [2, 2, 2]
  with pytest.raises(ValueError, match=r"capacities must be positive "
                     r"integers; got \[0\]"):
    mt.greedy(E, [1, 0, 1], A)
  with pytest.raises(ValueError, match=r"arrivals have shape \(7, 3\); "
                     r"expected \(m, 4\)"):
    mt.greedy(np.eye(4, dtype=np.float32), 1, A)
  with pytest.raises(ValueError, match=r"capacities has shape \(2,\)"):
    mt.offline_optimum(E, [1, 1], A)
  with pytest.raises(ValueError, match=r"weights \(='lsh'\)"):
    mt.greedy(E, 1, A, weights="lsh")
  with pytest.raises(ValueError, match=r"probe \(=0\)"):
    mt.ClusteredMIPS(E, probe=0)


def _numpy_router(probs, cap, decline, first_choices_first):
  """The router's rule written plainly with the module's primal-dual."""
  t, e = probs.shape
  fill, beta = np.zeros(e, int), np.zeros(e)
  growth = 1 + 1 / cap
  out = np.full((t, 2), -1)
  banned = [set() for _ in range(t)]
  order = ([(i, k) for k in range(2) for i in range(t)] if first_choices_first
           else [(i, k) for i in range(t) for k in range(2)])
  for i, k in order:
    gain = np.array([probs[i, j] - beta[j] if fill[j] < cap and
                     j not in banned[i] else -np.inf for j in range(e)])
    j = int(np.argmax(gain))
    banned[i].add(j)
    if (gain[j] > 0) if decline else np.isfinite(gain[j]):
      out[i, k] = j
      fill[j] += 1
      beta[j] = beta[j] * growth + probs[i, j] / ((growth ** cap - 1) * cap)
  return out


def test_online_router_equals_its_rule_and_respects_capacity():
  import jax
  from alpa_py.matching.router import online_matching_top2
  probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(0), (40, 6)) *
                         2, -1)
  for (cap, decline), ffirst in itertools.product(
      ((3, False), (8, False), (14, False), (3, True), (14, True)),
      (True, False)):
    experts, slots, gates = online_matching_top2(probs, cap, decline, ffirst)
    np.testing.assert_array_equal(
        np.asarray(experts),
        _numpy_router(np.asarray(probs), cap, decline, ffirst))
    ex = np.asarray(experts)
    for j in range(6):  # never over capacity, slots 0..count-1 in order
      used = np.asarray(slots)[ex == j]
      assert len(used) <= cap
      np.testing.assert_array_equal(np.sort(used), np.arange(len(used)))
    np.testing.assert_allclose(np.asarray(gates).sum(-1), 1.0, rtol=1e-5)
  # differentiable through the gates
  g = jax.grad(lambda p: online_matching_top2(p, 3)[2][:, 0].sum())(probs)
  assert np.abs(np.asarray(g)).sum() > 0


def test_moe_online_router_under_parallelize_equals_jit():
  import jax
  import alpa_py
  from alpa_py.models import MoEModel
  from models_for_tests import moe_setup
  state, batch, step = moe_setup(router="online_matching")
  want_state, want_loss = jax.jit(step)(state, batch)
  for method in (alpa_py.ShardParallel(), alpa_py.DataParallel()):
    got_state, got_loss = alpa_py.parallelize(step, method=method)(state, batch)
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
        got_state.params, want_state.params)
  with pytest.raises(ValueError, match=r"router \(='top1'\) must be one of "
                     r"\('gshard_top2', 'online_matching'\)"):
    MoEModel(num_experts=4, router="top1").init(
        jax.random.PRNGKey(0), batch["tokens"])


def test_expert_parallel_plan_applies_to_the_online_router():
  """The hand-written expert-parallel plan (experts split over the
  devices, the batch split too) runs the online router's step and equals
  the single-device step."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from alpa_py.bench.plans import ManualPlan, expert_spec, make_mesh
  from models_for_tests import moe_setup
  state, batch, step = moe_setup(router="online_matching")
  plan = ManualPlan("ep+dp", (8,), expert_spec, ("x",))
  mesh = make_mesh(jax.devices(), plan.mesh_shape)
  st, bt = plan.shardings(state, batch, mesh)
  assert any(s.spec == P("x") for s in jax.tree_util.tree_leaves(st))
  got_state, got_loss = jax.jit(
      step, in_shardings=(st, bt),
      out_shardings=(st, NamedSharding(mesh, P())))(state, batch)
  want_state, want_loss = jax.jit(step)(state, batch)
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
      got_state.params, want_state.params)
