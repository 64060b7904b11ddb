"""A tiny multi-LoRA GPT and its greedy reference, shared by the serving
tests: 8 adapters with random nonzero ``lora_B``, a workload generator in
Punica's four popularity settings, and a check that a request's tokens are
greedy decoding of it alone by the full (uncached) model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py import serve
from alpa_py.models.gpt import GPT, GPTConfig

NUM_ADAPTERS = 8
CFG = GPTConfig(vocab_size=64, seq_len=32, hidden=32, num_heads=4,
                num_layers=2, lora_adapters=NUM_ADAPTERS, lora_rank=4)


@functools.lru_cache(maxsize=None)
def tiny_model():
  model = GPT(CFG)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, CFG.seq_len),
                                                        jnp.int32),
                      jnp.zeros((1,), jnp.int32))
  # adapters that change the output: random nonzero B
  keys = iter(jax.random.split(jax.random.PRNGKey(1), 64))

  def nonzero(path, x):
    if getattr(path[-1], "key", None) == "lora_B":
      return 0.5 * jax.random.normal(next(keys), x.shape, x.dtype)
    return x
  params = jax.tree_util.tree_map_with_path(nonzero, params)
  return model, params


@functools.lru_cache(maxsize=None)
def reference_logits():
  model, params = tiny_model()

  @jax.jit
  def logits(tokens, adapter):  # tokens padded to seq_len (causal model)
    return model.apply(params, tokens[None], adapter[None])[0]
  return logits


def check_greedy(req, out):
  """``out`` is greedy decoding of ``req`` alone by the full model (where
  the reference's top two logits are within 1e-5, either is accepted)."""
  f = reference_logits()
  seq = list(req.prompt)
  assert 0 < len(out) <= req.max_new_tokens
  for i, tok in enumerate(out):
    padded = np.zeros(CFG.seq_len, np.int32)
    padded[:len(seq)] = seq
    row = np.asarray(f(padded, np.int32(req.adapter)))[len(seq) - 1]
    best = int(np.argmax(row))
    if tok != best:
      assert row[best] - row[tok] <= 1e-5, (req, i, tok, best)
    seq.append(tok)
  if len(out) < req.max_new_tokens:
    assert out[-1] in req.stop


def workload(kind: str, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  if kind == "distinct":
    adapters = [i % NUM_ADAPTERS for i in range(n)]
  elif kind == "uniform":
    adapters = list(rng.integers(0, 3, n))  # ~sqrt(n) adapters
  elif kind == "skewed":
    p = 1.0 / np.arange(1, NUM_ADAPTERS + 1) ** 1.5
    adapters = list(rng.choice(NUM_ADAPTERS, n, p=p / p.sum()))
  else:
    adapters = [3] * n
  reqs = []
  for i, a in enumerate(adapters):
    plen = int(rng.integers(1, 12))
    reqs.append(serve.Request(
        prompt=[int(t) for t in rng.integers(0, CFG.vocab_size, plen)],
        adapter=int(a) if i % 5 else -1,  # some requests use the base model
        max_new_tokens=int(rng.integers(1, 12))))
  return reqs
