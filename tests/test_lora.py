"""Batched multi-LoRA operators against the reference (Pallas in interpret
mode off GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpa_py.kernels import lora

N_ADAPTERS = 6
TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2),
       jnp.float16: (5e-3, 5e-3)}


def popularity(kind, t, n, key):
  if kind == "distinct":
    return jnp.arange(t) % n
  if kind == "identical":
    return jnp.full((t,), 2)
  if kind == "uniform":
    return jax.random.randint(key, (t,), 0, n)
  if kind == "zipf":
    p = 1.0 / np.arange(1, n + 1) ** 1.5
    return jax.random.choice(key, n, (t,), p=jnp.asarray(p / p.sum()))
  if kind == "skewed":  # most tokens on one adapter, some without any
    ids = jax.random.randint(key, (t,), -1, n)
    return jnp.where(jnp.arange(t) % 4 == 0, ids, 1)
  raise ValueError(kind)


def make(t, h_in, h_out, r, dtype, seed=0, layers=None):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  lead = (N_ADAPTERS,) if layers is None else (layers, N_ADAPTERS)
  x = jax.random.normal(k[0], (t, h_in)).astype(dtype)
  A = (jax.random.normal(k[1], lead + (h_in, r)) / np.sqrt(h_in)).astype(dtype)
  B = (jax.random.normal(k[2], lead + (r, h_out)) / np.sqrt(r)).astype(dtype)
  scale = jnp.linspace(0.5, 2.0, N_ADAPTERS)
  return x, A, B, scale, k[3]


def check(got, want, dtype):
  rtol, atol = TOL[dtype]
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["pallas", "ragged_dot"])
@pytest.mark.parametrize("pop", ["distinct", "uniform", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("t", [1, 7, 16, 33])
def test_bgmv_popularity_and_batch(backend, pop, t):
  x, A, B, scale, key = make(t, 32, 48, 8, jnp.float32)
  ids = popularity(pop, t, N_ADAPTERS, key)
  want = lora.bgmv(x, A, B, ids, scale, backend="reference")
  check(lora.bgmv(x, A, B, ids, scale, backend=backend), want, jnp.float32)


@pytest.mark.parametrize("backend", ["pallas", "ragged_dot"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_and_mixed_ranks(backend, dtype):
  x, A, B, scale, key = make(20, 64, 32, 16, dtype)
  ids = popularity("uniform", 20, N_ADAPTERS, key)
  ranks = jnp.array([16, 4, 8, 1, 16, 2])
  want = lora.bgmv(x, A, B, ids, scale, ranks=ranks, backend="reference")
  got = lora.bgmv(x, A, B, ids, scale, ranks=ranks, backend=backend)
  assert got.dtype == dtype
  check(got, want, dtype)
  # the padding past each rank really is ignored
  A2 = A.at[1, :, 4:].set(7.0)
  check(lora.bgmv(x, A2, B, ids, scale, ranks=ranks, backend=backend), want, dtype)


@pytest.mark.parametrize("backend", ["pallas", "ragged_dot", "reference"])
def test_sgmv_segments(backend):
  x, A, B, scale, _ = make(40, 32, 32, 8, jnp.float32)
  seg_starts = jnp.array([0, 3, 3, 20, 21, 40])  # an empty segment too
  seg_ids = jnp.array([4, 0, -1, 2, 4])
  ids = lora.segments_to_ids(seg_starts, seg_ids, 40)
  want = lora.bgmv(x, A, B, ids, scale, backend="reference")
  got = jax.jit(lambda x, s, i: lora.sgmv(x, A, B, s, i, scale, backend=backend))(
      x, seg_starts, seg_ids)
  check(got, want, jnp.float32)


@pytest.mark.parametrize("backend", ["pallas", "ragged_dot"])
def test_layer_offset(backend):
  x, A, B, scale, key = make(9, 32, 32, 8, jnp.float32, layers=3)
  ids = popularity("uniform", 9, N_ADAPTERS, key)
  for layer in range(3):
    want = lora.bgmv(x, A[layer], B[layer], ids, scale, backend="reference")
    check(lora.bgmv(x, A, B, ids, scale, layer=layer, backend=backend), want,
          jnp.float32)


@pytest.mark.parametrize("backend", ["pallas", "ragged_dot"])
@pytest.mark.parametrize("pop", ["distinct", "skewed"])
def test_gradients_match_reference(backend, pop):
  x, A, B, scale, key = make(13, 32, 24, 8, jnp.float32)
  ids = popularity(pop, 13, N_ADAPTERS, key)
  ranks = jnp.array([8, 8, 4, 2, 8, 1])
  w = jax.random.normal(key, (13, 24))

  def loss(x, A, B, scale, be):
    return jnp.sum(w * lora.bgmv(x, A, B, ids, scale, ranks=ranks, backend=be))

  want = jax.grad(loss, argnums=(0, 1, 2, 3))(x, A, B, scale, "reference")
  got = jax.grad(loss, argnums=(0, 1, 2, 3))(x, A, B, scale, backend)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


def test_bad_inputs():
  x, A, B, scale, _ = make(4, 8, 8, 4, jnp.float32)
  with pytest.raises(ValueError, match="backend"):
    lora.bgmv(x, A, B, jnp.zeros(4, jnp.int32), scale, backend="cuda")
  with pytest.raises(ValueError, match="adapter_ids has shape"):
    lora.bgmv(x, A, B, jnp.zeros(3, jnp.int32), scale)
  with pytest.raises(ValueError, match="seg_starts has 2 entries for 2 segments"):
    lora.sgmv(x, A, B, jnp.array([0, 4]), jnp.array([0, 1]), scale)
  with pytest.raises(ValueError, match="do not chain"):
    lora.bgmv(x, A[:, :4], B, jnp.zeros(4, jnp.int32), scale)


@pytest.mark.parametrize("t,h_in,h_out,r", [(5, 40, 24, 7), (3, 96, 130, 64),
                                            (16, 256, 512, 16)])
def test_fused_bgmv_any_size_and_gpu_lowering(t, h_in, h_out, r):
  """The fused decode kernel covers sizes that are not powers of two with
  masked tiles (no padded copy of the adapters), and both kernels lower
  for CUDA through Pallas's Triton backend from this machine (its
  power-of-two rule is checked at lowering)."""
  x, A, B, scale, key = make(t, h_in, h_out, r, jnp.float32, seed=t)
  ids = jax.random.randint(key, (t,), -1, N_ADAPTERS)
  ranks = jnp.asarray([r, max(1, r // 2), 1, r, 3 % r + 1, r])
  got = lora.bgmv(x, A, B, ids, scale, ranks=ranks, backend="pallas",
                  interpret=True)
  check(got, lora.bgmv(x, A, B, ids, scale, ranks=ranks, backend="reference"),
        jnp.float32)
  assert np.all(np.asarray(got)[np.asarray(ids) < 0] == 0)
  starts = jnp.asarray([0, t // 2, t], jnp.int32)
  for fn in (lambda x_: lora.bgmv(x_, A, B, ids, scale, ranks=ranks,
                                  backend="pallas", interpret=False),
             lambda x_: lora.sgmv(x_, A, B, starts, jnp.asarray([1, -1]),
                                  scale, backend="pallas", interpret=False)):
    jax.jit(fn).trace(x).lower(lowering_platforms=("cuda",))


def test_auto_backend_follows_recorded_measurements(tmp_path, monkeypatch):
  from alpa_py.kernels import tuning
  monkeypatch.setenv("ALPA_PY_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(tuning, "PACKAGED", tmp_path / "none.json")
  tuning.records.cache_clear()
  x, A, B, scale, key = make(16, 64, 64, 8, jnp.float32)
  ids = popularity("uniform", 16, N_ADAPTERS, key)
  prims = lambda: {e.primitive.name for e in jax.make_jaxpr(
      lambda x_: lora.bgmv(x_, A, B, ids, scale))(x).jaxpr.eqns}
  try:
    # no record for this device: gather + batched matmul off GPU
    if jax.default_backend() != "gpu":
      assert "ragged_dot_general" not in prims()
    kind = tuning.device_kind()
    rec = lambda t, best: dict(op="lora_bgmv", dtype="float32", sizes=dict(
        tokens=t, rank=8, h_in=64, h_out=64), best=best, us={})
    tuning.write(kind, [rec(1, "reference"), rec(32, "ragged_dot")])
    # 16 tokens: nearer the 32-token record (log2 distance 1 vs 4)
    assert "ragged_dot_general" in prims()
    check(lora.bgmv(x, A, B, ids, scale),
          lora.bgmv(x, A, B, ids, scale, backend="reference"), jnp.float32)
    (tmp_path / "kernel_choices.json").write_text('{"schema": 0}')
    tuning.records.cache_clear()
    with pytest.raises(ValueError, match="schema 0, expected 1"):
      lora.bgmv(x, A, B, ids, scale)
  finally:
    tuning.records.cache_clear()
