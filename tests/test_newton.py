"""Gram-Gauss-Newton: convergence on an over-parameterized regression, the
three solvers agree, the data-parallel step equals the single-device one,
cross entropy, the sparse shifted-ReLU path, and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import alpa_py
from alpa_py.kernels.sparse_neuron import FiringIndex
from alpa_py.optim import gram_gauss_newton

N, D, M = 64, 16, 4096


def two_layer(p, x):
  return jnp.dot(jax.nn.relu(x @ p["W"].T), p["a"]) / np.sqrt(p["a"].shape[0])


def regression(n=N, d=D, m=M, seed=0):
  rng = np.random.default_rng(seed)
  X = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  y = jnp.asarray(rng.normal(size=(n,)).astype(np.float32))
  params = {"W": jax.random.normal(jax.random.PRNGKey(seed), (m, d)) / np.sqrt(d),
            "a": jax.random.normal(jax.random.PRNGKey(seed + 1), (m,))}
  return params, X, y


def mse(p, X, y):
  return 0.5 * jnp.mean(jnp.square(two_layer(p, X) - y))


def test_converges_where_adam_does_not():
  params, X, y = regression()
  opt = gram_gauss_newton(two_layer)
  p, state = params, opt.init(params)
  losses = []
  for _ in range(15):
    p, state, info = opt.step(p, state, X, y)
    losses.append(float(mse(p, X, y)))
    assert np.isfinite(float(info["solve_time_s"])) and info["solve_time_s"] >= 0
  assert min(losses) < 1e-8, losses

  def adam_final(lr):
    tx = optax.adam(lr)
    q, s = params, tx.init(params)
    step = jax.jit(lambda q, s: (lambda g: (optax.apply_updates(q, tx.update(g, s, q)[0]),
                                            tx.update(g, s, q)[1]))(jax.grad(mse)(q, X, y)))
    for _ in range(15):
      q, s = step(q, s)
    return float(mse(q, X, y))

  best = min(adam_final(lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1))
  assert best > 1e-4, best  # the tuned Adam rate is far from it


def test_solvers_agree_on_the_step():
  params, X, y = regression(seed=3)
  deltas = {}
  for solver in ("cholesky", "cg", "sketched_cg", "nystrom_cg"):
    opt = gram_gauss_newton(two_layer, solver=solver, cg_tol=1e-7,
                            cg_max_iters=200, sketch_size=32)
    p, _, info = opt.step(params, opt.init(params), X, y)
    deltas[solver] = jax.tree_util.tree_map(lambda a, b: a - b, p, params)
    if solver != "cholesky":
      assert 0 < int(info["cg_iters"]) <= 200
  for solver in ("cg", "sketched_cg", "nystrom_cg"):
    for a, b in zip(jax.tree_util.tree_leaves(deltas["cholesky"]),
                    jax.tree_util.tree_leaves(deltas[solver])):
      scale = float(jnp.max(jnp.abs(a)))
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale)


def test_blockwise_gram_equals_materialised():
  params, X, _ = regression(n=24, m=256)
  full = gram_gauss_newton(two_layer).gram(params, X)
  blocked = gram_gauss_newton(two_layer, jacobian_bytes=4 * 5 * (256 * 17)).gram(
      params, X)  # 5 dual vectors per block
  np.testing.assert_allclose(blocked, full, rtol=1e-5, atol=1e-5)
  J = jax.jacrev(lambda p: two_layer(p, X))(params)
  J = jnp.concatenate([j.reshape(24, -1) for j in jax.tree_util.tree_leaves(J)], 1)
  np.testing.assert_allclose(full, J @ J.T, rtol=1e-4, atol=1e-4)


def test_nystrom_factor_and_preconditioned_iterations():
  """Randomly pivoted Cholesky: K - F F^T stays PSD and its trace falls
  with the rank; the diagonal and columns are J's; at rank N the factor is
  exact; the preconditioner cuts CG's iterations to the same tolerance."""
  from alpa_py.optim import ggn_solvers
  from alpa_py.optim.ggn_operator import dense_operator
  params, X, y = regression(n=48, m=512, seed=5)
  for per_example in (True, False):
    op = dense_operator(two_layer, params, X, 1 << 30, per_example)
    K = np.asarray(op.gram(), np.float64)
    np.testing.assert_allclose(op.diag(), np.diag(K), rtol=1e-4)
    np.testing.assert_allclose(op.columns(jnp.array([3, 0, 47])),
                               K[:, [3, 0, 47]], rtol=1e-4,
                               atol=1e-4 * np.abs(K).max())
  key = jax.random.PRNGKey(0)
  traces = []
  for s in (4, 16, 48):
    F = np.asarray(ggn_solvers.nystrom_factor(op, key, s, block=8), np.float64)
    R = K - F @ F.T
    assert np.linalg.eigvalsh(R).min() > -1e-3 * np.trace(K)
    traces.append(np.trace(R))
  assert traces[0] > traces[1] > traces[2]
  assert traces[2] < 1e-3 * np.trace(K)  # rank N: exact
  # decaying input scales: a Gram spectrum that decays, as real data's does
  params, X, y = regression(n=96, m=512, seed=5)
  X = X * (1.0 / np.arange(1, D + 1) ** 1.5)[None, :].astype(np.float32)
  iters = {}
  for solver in ("cg", "nystrom_cg"):
    opt = gram_gauss_newton(two_layer, solver=solver, damping=1e-4,
                            cg_tol=1e-5, cg_max_iters=500, sketch_size=16)
    _, _, info = opt.step(params, opt.init(params), X, y)
    assert float(info["solve_residual"]) < 1e-3
    iters[solver] = int(info["cg_iters"])
  assert iters["nystrom_cg"] < iters["cg"] / 2, iters


def test_nystrom_factor_kept_between_refreshes():
  """nystrom_refresh=3: the factor is built at steps 0 and 3 and reused at
  1 and 2 (the same array); every step still equals cholesky's, since a
  stale factor preconditions but does not change the solution."""
  params, X, y = regression(seed=4)
  opt = gram_gauss_newton(two_layer, solver="nystrom_cg", sketch_size=16,
                          cg_tol=1e-7, cg_max_iters=300, nystrom_refresh=3)
  ref = gram_gauss_newton(two_layer, solver="cholesky")
  p, st, q, sr = params, opt.init(params), params, ref.init(params)
  factors = []
  for _ in range(4):
    p, st, info = opt.step(p, st, X, y)
    q, sr, _ = ref.step(q, sr, X, y)
    factors.append(np.asarray(st.factor))
    assert float(info["solve_residual"]) < 1e-4
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
      scale = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)
  assert factors[0].shape == (X.shape[0], 16)
  np.testing.assert_array_equal(factors[1], factors[0])
  np.testing.assert_array_equal(factors[2], factors[0])
  assert not np.array_equal(factors[3], factors[0])
  assert gram_gauss_newton(two_layer, solver="nystrom_cg").init(
      params).factor is None
  with pytest.raises(ValueError, match=r"nystrom_refresh \(=0\)"):
    gram_gauss_newton(two_layer, nystrom_refresh=0)


@pytest.mark.parametrize("solver", ["cholesky", "cg", "sketched_cg",
                                    "nystrom_cg"])
def test_data_parallel_step_equals_single_device(solver):
  params, X, y = regression(m=512)
  opt = gram_gauss_newton(two_layer, solver=solver)

  def train_step(p, st, x, t):
    p, st, info = opt.step(p, st, x, t)
    return p, st, info["loss"], opt.gram(p, x)

  ref = jax.jit(train_step)(params, opt.init(params), X, y)
  par = alpa_py.parallelize(train_step, method=alpa_py.DataParallel(),
                            batch_argnums=(2, 3))
  out = par(params, opt.init(params), X, y)
  jax.block_until_ready(out)
  ex = par.get_executable(params, opt.init(params), X, y)
  # the points are split over the 8 devices (the Gram is assembled across them)
  assert ex.plan.inputs[-1].spec == jax.sharding.PartitionSpec("x")
  assert ex.plan.inputs[-2].spec == jax.sharding.PartitionSpec("x")
  np.testing.assert_allclose(float(out[2]), float(ref[2]), rtol=1e-5)
  np.testing.assert_allclose(out[3], ref[3], rtol=1e-5, atol=1e-5)  # Gram
  for a, b in zip(jax.tree_util.tree_leaves(out[0]),
                  jax.tree_util.tree_leaves(ref[0])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cross_entropy_ggn():
  rng = np.random.default_rng(0)
  n, d, k, m = 40, 8, 4, 256
  X = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  labels = jax.nn.one_hot(rng.integers(0, k, n), k)
  params = {"W": jax.random.normal(jax.random.PRNGKey(0), (m, d)) / np.sqrt(d),
            "V": 0.1 * jax.random.normal(jax.random.PRNGKey(1), (m, k))}
  apply = lambda p, x: jax.nn.relu(x @ p["W"].T) @ p["V"] / np.sqrt(m)
  steps = {}
  for solver in ("cholesky", "cg"):
    opt = gram_gauss_newton(apply, loss="cross_entropy", damping=0.1,
                            solver=solver, cg_tol=1e-7, cg_max_iters=300)
    p, st = params, opt.init(params)
    losses = []
    for i in range(6):
      p, st, info = opt.step(p, st, X, labels)
      losses.append(float(info["loss"]))
      if i == 0:
        steps[solver] = p
    assert losses[-1] < 0.1 * losses[0], losses
  # the dual solution equals the primal damped GGN step
  J = jax.jacrev(lambda p: apply(p, X).reshape(-1))(params)
  J = jnp.concatenate([j.reshape(n * k, -1) for j in jax.tree_util.tree_leaves(J)], 1)
  prob = jax.nn.softmax(apply(params, X), -1)
  H = jax.scipy.linalg.block_diag(*[jnp.diag(q) - jnp.outer(q, q) for q in prob])
  g = J.T @ (prob - labels).reshape(-1)
  delta = jnp.linalg.solve(J.T @ H @ J + 0.1 * jnp.eye(J.shape[1]), g)
  got = jnp.concatenate([(a - b).reshape(-1) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(steps["cholesky"]))])
  np.testing.assert_allclose(got, delta, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(delta))))
  for a, b in zip(jax.tree_util.tree_leaves(steps["cholesky"]),
                  jax.tree_util.tree_leaves(steps["cg"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("solver", ["cholesky", "nystrom_cg"])
def test_sparse_path_equals_dense_ggn(solver):
  rng = np.random.default_rng(1)
  n, d, m, b = 32, 8, 2000, 2.5
  X = rng.normal(size=(n, d)).astype(np.float32)
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  y = jnp.asarray(0.1 * rng.normal(size=(n,)).astype(np.float32))
  W = jax.random.normal(jax.random.PRNGKey(0), (m, d))
  a = jax.random.rademacher(jax.random.PRNGKey(1), (m,), jnp.float32)
  shifted = lambda p, x: jnp.dot(jax.nn.relu(x @ p["W"].T - b), a)
  dense = gram_gauss_newton(shifted, damping=1e-4)
  sparse = gram_gauss_newton(None, damping=1e-4, solver=solver,
                             sketch_size=8, cg_tol=1e-7, cg_max_iters=300)
  index = FiringIndex.build(W, X)
  p, st_d, st_s = {"W": W}, dense.init(None), sparse.init(None)
  losses = []
  for _ in range(5):
    p, st_d, info_d = dense.step(p, st_d, jnp.asarray(X), y)
    index, st_s, info_s = sparse.step_sparse(index, st_s, a, y, b)
    losses.append(float(info_s["loss"]))
    assert 0 < info_s["union"] < m / 2  # only firing neurons enter J
    np.testing.assert_allclose(float(info_s["loss"]), float(info_d["loss"]),
                               rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(index.W, p["W"], rtol=1e-4, atol=1e-5)
  assert losses[-1] < 1e-3 * losses[0], losses


def test_sparse_path_empty_union_and_singular_keep_the_index():
  from alpa_py.optim import SingularGramError
  rng = np.random.default_rng(2)
  X = rng.normal(size=(6, 8)).astype(np.float32)
  X /= np.linalg.norm(X, axis=1, keepdims=True)
  W = jax.random.normal(jax.random.PRNGKey(0), (500, 8))
  a = jax.random.rademacher(jax.random.PRNGKey(1), (500,), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6,)).astype(np.float32))
  opt = gram_gauss_newton(None, damping=0.0)
  index = FiringIndex.build(W, X)
  with pytest.warns(UserWarning, match="no neuron fires"):
    index, st, info = opt.step_sparse(index, opt.init(None), a, y, 100.0)
  assert info["union"] == 0
  np.testing.assert_allclose(index.W, W)  # unchanged and still usable
  # duplicate points with different targets: singular, index handed back
  X2 = np.concatenate([X[:1], X[:1]])
  index = FiringIndex.build(W, X2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(SingularGramError, match="singular") as err:
      opt.step_sparse(index, opt.init(None), a, jnp.array([0.0, 1.0]), 0.5)
  np.testing.assert_allclose(err.value.index.W, W)
  with pytest.raises(ValueError, match="mean-squared error only"):
    gram_gauss_newton(None, loss="cross_entropy").step_sparse(
        err.value.index, opt.init(None), a, jnp.zeros(2), 0.5)


def test_bad_input():
  params, X, y = regression(n=40, d=2, m=4)  # 12 parameters < 40 outputs
  opt = gram_gauss_newton(two_layer, damping=0.0)
  with pytest.warns(UserWarning, match=r"40 outputs but only 12 parameters.*"
                    r"using damping=0.001"):
    p, _, info = opt.step(params, opt.init(params), X, y)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(p))
  # damping 0 with a singular Gram (duplicate points): a clear error, no NaNs
  params, X, y = regression(n=8, m=64)
  X = X.at[1].set(X[0])
  y = y.at[1].set(y[0] + 1.0)
  for solver in ("cholesky", "cg"):
    opt = gram_gauss_newton(two_layer, damping=0.0, solver=solver)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      with pytest.raises(ValueError, match=r"singular \(damping=0.0\).*damping > 0"):
        opt.step(params, opt.init(params), X, y)
  # traced, the step leaves the parameters unchanged and flags it
  opt = gram_gauss_newton(two_layer, damping=0.0)
  p, _, info = jax.jit(opt.step)(params, opt.init(params), X, y)
  assert bool(info["singular"])
  np.testing.assert_array_equal(p["W"], params["W"])
  logits = lambda p, x: jnp.stack([two_layer(p, x), -two_layer(p, x)], -1)
  with pytest.raises(ValueError, match="damping.*cross-entropy"):
    gram_gauss_newton(logits, loss="cross_entropy", damping=0.0).step(
        params, opt.init(params), X, jax.nn.one_hot(jnp.zeros(8, int), 2))
  with pytest.raises(ValueError, match="one-hot"):
    gram_gauss_newton(logits, loss="cross_entropy").step(
        params, opt.init(params), X, jnp.zeros(8, jnp.int32))
  with pytest.raises(ValueError, match=r"targets have shape \(8, 2\) but the "
                     r"model's outputs have shape \(8,\)"):
    gram_gauss_newton(two_layer).step(params, opt.init(params), X,
                                      jnp.zeros((8, 2)))
  with pytest.raises(ValueError, match="solver"):
    gram_gauss_newton(two_layer, solver="lu")
  with pytest.raises(ValueError, match="learning_rate"):
    gram_gauss_newton(two_layer, learning_rate=0)


@pytest.mark.parametrize("cols", [1, 64, 300])
def test_softmax_whitening_under_jit(cols):
  # A = blockdiag(diag(sqrt p) - sqrt p p^T), A^T A = the softmax Hessian;
  # checked under jit, where a vmap formulation was miscompiled on CPU
  from alpa_py.optim.ggn_operator import softmax_whitening
  logits = jax.random.normal(jax.random.PRNGKey(0), (64, 10))
  prob = jax.nn.softmax(logits, -1)
  q = jnp.sqrt(prob)
  A = jax.scipy.linalg.block_diag(*[jnp.diag(q[i]) - jnp.outer(q[i], prob[i])
                                    for i in range(64)])
  H = jax.scipy.linalg.block_diag(*[jnp.diag(p) - jnp.outer(p, p) for p in prob])
  np.testing.assert_allclose(A.T @ A, H, atol=1e-6)
  Y = jax.random.normal(jax.random.PRNGKey(1), (640, cols)).squeeze()
  w = softmax_whitening(logits)
  np.testing.assert_allclose(jax.jit(w.apply)(Y), A @ Y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(w.apply_t)(Y), A.T @ Y, rtol=1e-5, atol=1e-5)
