"""Serving variants: rank truncation by SVD and a merged adapter, checked
against the LoRA GPT they come from."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alpa_py.models import GPT, GPTConfig
from alpa_py.serve import variants


@pytest.fixture(scope="module")
def lora_gpt():
  cfg = GPTConfig(vocab_size=32, seq_len=8, hidden=32, num_heads=4,
                  num_layers=2, lora_adapters=3, lora_rank=4)
  model = GPT(cfg)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32
  params = model.init(jax.random.PRNGKey(0), tokens,
                      jnp.zeros(2, jnp.int32))
  rng = np.random.default_rng(0)
  # B starts at zero in LoRA; give every adapter a real update
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(size=x.shape).astype(np.float32) * 0.3
                       if getattr(path[-1], "key", None) == "lora_B"
                       else np.asarray(x)), params)
  return cfg, params, tokens


def _logits(cfg, params, tokens, adapters):
  return np.asarray(GPT(cfg).apply(params, tokens,
                                   jnp.asarray(adapters, jnp.int32)))


def test_truncation_at_full_rank_is_exact(lora_gpt):
  cfg, params, tokens = lora_gpt
  same, cfg2 = variants.truncate_rank(params, cfg, cfg.lora_rank)
  np.testing.assert_allclose(_logits(cfg2, same, tokens, [0, 2]),
                             _logits(cfg, params, tokens, [0, 2]),
                             rtol=1e-4, atol=1e-4)


def test_truncation_is_the_best_low_rank_update(lora_gpt):
  cfg, params, tokens = lora_gpt
  low, cfg2 = variants.truncate_rank(params, cfg, 2)
  assert cfg2.lora_rank == 2
  p, q = params["params"], low["params"]
  for kind in ("qkv", "fc1"):
    a, b = p["block_1"][kind]["lora_A"][1], p["block_1"][kind]["lora_B"][1]
    a2, b2 = q["block_1"][kind]["lora_A"][1], q["block_1"][kind]["lora_B"][1]
    assert a2.shape[-1] == 2 and b2.shape[0] == 2
    full = (16.0 / 4) * a @ b
    approx = (16.0 / 2) * a2 @ b2
    s = np.linalg.svd(full, compute_uv=False)
    assert np.linalg.norm(full - approx) == pytest.approx(
        np.sqrt((s[2:] ** 2).sum()), rel=1e-4)
  out = _logits(cfg2, low, tokens, [1, -1])
  ref = _logits(cfg, params, tokens, [1, -1])
  np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)  # base
  assert not np.allclose(out[0], ref[0], atol=1e-3)  # rank 2 < 4 differs
  with pytest.raises(ValueError, match=r"rank \(=5\) must lie in \[1, "
                     r"lora_rank=4\]"):
    variants.truncate_rank(params, cfg, 5)


def test_merged_adapter_runs_as_the_base_model(lora_gpt):
  cfg, params, tokens = lora_gpt
  merged = variants.merge_adapter(params, cfg, 2)
  np.testing.assert_allclose(_logits(cfg, merged, tokens, [-1, -1]),
                             _logits(cfg, params, tokens, [2, 2]),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(_logits(cfg, merged, tokens, [-1, -1]),
                         _logits(cfg, params, tokens, [-1, -1]), atol=1e-3)
  with pytest.raises(ValueError, match=r"adapter \(=3\) must lie in"):
    variants.merge_adapter(params, cfg, 3)
