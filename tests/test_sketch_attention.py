"""sketch.KVAttention (softmax attention over a dynamic KV set, heavy
buckets exactly and the rest sampled) and the serving engine's
``attention="kernel_sum"`` decode, against exact attention."""

import sys
import os

import numpy as np
import pytest

from alpa_py import serve
from alpa_py.sketch import KVAttention

sys.path.insert(0, os.path.dirname(__file__))
from serve_models import CFG, tiny_model  # noqa: E402


def clustered_cache(n, d, seed=0, comps=32):
  """Keys from a mixture (as a real cache's keys cluster), values with a
  per-component mean; queries near stored keys."""
  rng = np.random.default_rng(seed)
  ck, cv = rng.normal(size=(comps, d)), rng.normal(size=(comps, d))
  lab = rng.integers(comps, size=n)
  K = (ck[lab] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)
  V = (cv[lab] + rng.normal(size=(n, d))).astype(np.float32)
  return K, V, rng


def rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_attend_exact_is_softmax_attention():
  K, V, rng = clustered_cache(500, 16)
  s = KVAttention(16)
  s.insert(K, V)
  q = rng.normal(size=16).astype(np.float32)
  sc = K.astype(np.float64) @ q / 4.0
  w = np.exp(sc - sc.max())
  np.testing.assert_allclose(s.attend_exact(q)[0], (w @ V) / w.sum(),
                             rtol=1e-4, atol=1e-5)
  # below exact_below, attend is exact and counts every key
  np.testing.assert_allclose(s.attend(q), s.attend_exact(q), rtol=1e-5)
  assert s.last_evaluations == 500


def test_sampled_attention_within_eps_and_sublinear():
  n, d = 20000, 32
  K, V, rng = clustered_cache(n, d)
  s = KVAttention(d, eps=0.1, exact_below=256, seed=0)
  s.insert(K, V)
  errs, evals = [], []
  for _ in range(40):
    q = K[rng.integers(n)] + rng.normal(size=d).astype(np.float32)
    errs.append(rel(s.attend(q)[0], s.attend_exact(q)[0]))
    evals.append(s.last_evaluations)
  assert np.mean(np.array(errs) <= 0.1) >= 0.9, errs
  assert np.median(evals) < 0.25 * n, evals


def test_diffuse_attention_falls_back_to_exact():
  # iid keys and zero-mean values: the output nearly cancels, sampling
  # cannot reach eps cheaply, so the query is answered by an exact pass
  rng = np.random.default_rng(1)
  n, d = 8000, 32
  K = rng.normal(size=(n, d)).astype(np.float32)
  V = rng.normal(size=(n, d)).astype(np.float32)
  s = KVAttention(d, exact_below=256, seed=0)
  s.insert(K, V)
  q = rng.normal(size=d).astype(np.float32)
  assert rel(s.attend(q)[0], s.attend_exact(q)[0]) < 1e-4
  assert s.last_evaluations >= n


def test_insert_delete_replace_track_the_set():
  n, d = 6000, 16
  K, V, rng = clustered_cache(n, d, seed=2)
  s = KVAttention(d, eps=0.05, exact_below=64, seed=0)
  ids = s.insert(K[:4000], V[:4000])
  s.delete(ids[:1000])
  s.replace(ids[1000:1500], K[4000:4500], V[4000:4500])
  for k, v in zip(K[4500:4600], V[4500:4600]):  # one at a time, as decode
    s.insert(k, v)
  keep = np.concatenate([K[4000:4500], K[1500:4000], K[4500:4600]])
  vals = np.concatenate([V[4000:4500], V[1500:4000], V[4500:4600]])
  assert len(s) == len(keep)
  # the buckets' spreads equal a recomputation from their members
  ks = s._ks
  live = np.flatnonzero(ks._alive[:ks._n])
  b = ks._bucket[live]
  r2 = np.bincount(b, ((ks._X[live] - ks._centers[b]).astype(np.float64)
                       ** 2).sum(1), minlength=len(ks._centers))
  np.testing.assert_allclose(s._r2, r2, rtol=1e-6, atol=1e-6)
  ref = KVAttention(d, exact_below=10 ** 9)
  ref.insert(keep, vals)
  sampled = 0
  for _ in range(10):
    q = 2 * keep[rng.integers(len(keep))] + rng.normal(size=d).astype(
        np.float32)
    np.testing.assert_allclose(s.attend_exact(q), ref.attend_exact(q),
                               rtol=1e-4, atol=1e-5)
    assert rel(s.attend(q)[0], ref.attend_exact(q)[0]) < 0.1
    sampled += s.last_sampled
  assert sampled >= 5  # peaked queries: answered from draws


def test_large_scores_do_not_overflow():
  # keys and queries scaled up: scores far above the centres' (by |q| r)
  K, V, rng = clustered_cache(6000, 16, seed=4)
  s = KVAttention(16, exact_below=64, seed=0)
  s.insert(8 * K, V)
  for _ in range(5):
    q = 8 * K[rng.integers(6000)]
    out = s.attend(q)[0]
    assert np.all(np.isfinite(out))
    assert rel(out, s.attend_exact(q)[0]) < 0.1


def test_adaptive_adversary_keeps_fresh_draws_within_eps():
  from alpa_py.sketch.attention import adaptive_attack
  K, V, _ = clustered_cache(8000, 16, seed=5)
  s = KVAttention(16, eps=0.1, exact_below=256, seed=0)
  s.insert(K, V)
  e = adaptive_attack(s, queries=120, gain=1.0, step=0.05, seed=1)
  assert len(e) == 120 and np.mean(e <= 0.1) >= 0.9


def test_bad_input():
  s = KVAttention(8)
  with pytest.raises(ValueError, match="empty set"):
    s.attend(np.zeros(8))
  with pytest.raises(ValueError, match=r"keys must be \[m, 8\]"):
    s.insert(np.zeros((3, 4)), np.zeros((3, 8)))
  with pytest.raises(ValueError, match="3 keys but 2 values"):
    s.insert(np.zeros((3, 8)), np.zeros((2, 8)))
  ids = s.insert(np.ones((3, 8)), np.ones((3, 8)))
  with pytest.raises(KeyError, match="unknown id"):
    s.delete([ids[-1] + 5])
  with pytest.raises(ValueError, match=r"queries have shape \(1, 5\)"):
    s.attend(np.zeros(5))
  for kw, match in ((dict(eps=0.0), "eps"), (dict(delta=1.0), "delta"),
                    (dict(scale=-1.0), "scale"), (dict(heavy=0.0), "heavy")):
    with pytest.raises(ValueError, match=match):
      KVAttention(8, **kw)


def _requests(rng, n=3):
  return [serve.Request(prompt=[int(t) for t in rng.integers(64, size=9)],
                        adapter=a, max_new_tokens=10)
          for a in (0, 3, -1)[:n]]


def test_engine_kernel_sum_short_contexts_match_exact():
  # contexts below exact_below are attended exactly: the same tokens
  model, params = tiny_model()
  reqs = _requests(np.random.default_rng(0))
  exact = serve.Engine(model, params, max_batch=4).generate(reqs)
  eng = serve.Engine(model, params, max_batch=4, attention="kernel_sum")
  assert eng.generate(reqs) == exact
  st = eng.stats
  assert st.attention_keys > 0 and st.attention_evaluations == \
      st.attention_keys


def test_engine_score_teacher_forces_both_attentions():
  model, params = tiny_model()
  req = _requests(np.random.default_rng(1), 1)[0]
  ex = serve.Engine(model, params, max_batch=2)
  traj = ex.generate([req])[0]
  se = ex.score(req, traj)
  assert se.shape == (len(traj), CFG.vocab_size) and se.dtype == np.float32
  assert list(se.argmax(1)) == traj  # greedy: the argmax is the trajectory
  with pytest.raises(ValueError, match="continuation is empty"):
    ex.score(req, [])
  with pytest.raises(ValueError, match="token id 99"):
    ex.score(req, [1, 99])
  with pytest.raises(ValueError, match="token id 1.5"):
    ex.score(req, [1, 1.5])
  with pytest.raises(ValueError, match="prompt \\+ continuation is 39"):
    ex.score(req, [1] * 30)


def _peaked_long_model(seq_len):
  """A tiny GPT whose query projection is scaled up (peaked attention, as
  trained models have) with room for long contexts."""
  import jax
  import jax.numpy as jnp
  from alpa_py.models.gpt import GPT, GPTConfig
  cfg = GPTConfig(vocab_size=64, seq_len=seq_len, hidden=32, num_heads=2,
                  num_layers=2, lora_adapters=1, lora_rank=4)
  model = GPT(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                      jnp.zeros((1,), jnp.int32))

  def scale_q(path, x):
    names = [getattr(p, "key", None) for p in path]
    if "qkv" in names and names[-1] == "kernel":
      return x.at[:, :cfg.hidden].multiply(4.0)
    return x
  return model, jax.tree_util.tree_map_with_path(scale_q, params)


def test_engine_sampled_attention_keeps_the_greedy_argmax():
  # a 1,200-token context attended by draws (the exact fallback switched
  # off; heavy buckets exactly), teacher-forced along the exact trajectory,
  # while another request is served alongside and gets its events
  model, params = _peaked_long_model(1600)
  rng = np.random.default_rng(0)
  req = serve.Request(prompt=[int(t) for t in rng.integers(64, size=1200)],
                      max_new_tokens=10)
  other = serve.Request(prompt=[3, 4, 5], max_new_tokens=4)
  ex = serve.Engine(model, params, max_batch=2, page_size=32)
  traj, other_out = ex.generate([req, other])
  eng = serve.Engine(model, params, max_batch=2, page_size=32,
                     attention="kernel_sum",
                     attention_options=dict(exact_below=256, eps=0.05,
                                            fallback=1.0, seed=0))
  rid = eng.submit(other)
  sa = eng.score(req, traj)
  assert eng.sketch.sampled > 0
  assert eng.stats.attention_evaluations < eng.stats.attention_keys
  assert np.mean(sa.argmax(1) == np.array(traj)) >= 0.9
  got = []
  while eng.has_work:  # the other request's events were kept for step()
    got += [ev.token for ev in eng.step() if ev.rid == rid]
  assert got == other_out


def test_engine_attention_errors_name_the_value():
  model, params = tiny_model()
  with pytest.raises(ValueError, match="attention \\(='topk'\\)"):
    serve.Engine(model, params, attention="topk")
  with pytest.raises(ValueError, match="attention_options"):
    serve.Engine(model, params, attention="kernel_sum",
                 attention_options=dict(bogus=1))
  with pytest.raises(ValueError, match="attention_options.*eps"):
    serve.Engine(model, params, attention="kernel_sum",
                 attention_options=dict(eps=2.0))
  with pytest.raises(ValueError, match="fixes the head dimension"):
    serve.Engine(model, params, attention="kernel_sum",
                 attention_options=dict(scale=1.0))


def test_engine_kernel_sum_survives_preemption_and_frees_structures():
  # a small pool preempts; a preempted sequence drops its structures and
  # builds them again at its re-prefill; every structure goes at the end
  from serve_models import check_greedy
  model, params = tiny_model()
  reqs = [serve.Request(prompt=[i + 1, 2 * i + 3], adapter=i,
                        max_new_tokens=20) for i in range(4)]
  eng = serve.Engine(model, params, max_batch=4, page_size=4, num_pages=12,
                     attention="kernel_sum")
  outs = eng.generate(reqs)
  assert eng.stats.preemptions > 0
  for req, out in zip(reqs, outs):
    check_greedy(req, out)
  assert not eng.sketch._sets
