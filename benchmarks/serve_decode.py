"""One decode step of the multi-LoRA engine at batch 32: 32 distinct
adapters vs one adapter vs the base model alone, timed side by side
(interleaved rounds, medians), with ratios.

  python benchmarks/serve_decode.py [--hidden 1024 --layers 4 --rank 16
      --batch 32 --context 256 --rounds 21] [--json PATH]

The step is ``serve.decoder.decode_step`` exactly as the engine calls it
(paged KV cache of ``context`` tokens per row, BGMV with one adapter slot
per row); only the slot ids differ between the variants.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from alpa_py.driver.candidate_timing import interleaved_medians
from alpa_py.models.gpt import GPT, GPTConfig
from alpa_py.serve import decoder
from alpa_py.serve.adapters import AdapterCache, host_adapters


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--context", type=int, default=256)
  ap.add_argument("--page-size", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=21)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  b, ps = args.batch, args.page_size
  cfg = GPTConfig(vocab_size=32000, seq_len=args.context + 16,
                  hidden=args.hidden, num_heads=args.heads,
                  num_layers=args.layers, lora_adapters=b,
                  lora_rank=args.rank, dtype=dtype)
  t0 = time.perf_counter()
  params = jax.jit(GPT(cfg).init)(jax.random.PRNGKey(0),
                                  jnp.zeros((1, 8), jnp.int32),
                                  jnp.zeros((1,), jnp.int32))
  cache = AdapterCache(host_adapters(params, cfg.num_layers), b, dtype)
  for a in range(b):
    cache.ensure(a, set())
  lay = decoder.Layout(cfg, ps)
  pages_per_row = -(-cfg.seq_len // ps)
  shape = (cfg.num_layers, b * pages_per_row + 1, ps, cfg.num_heads,
           cfg.hidden // cfg.num_heads)
  kv = [jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)]
  tables = np.arange(b * pages_per_row, dtype=np.int32).reshape(b, -1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, b).astype(np.int32)
  positions = np.full(b, args.context, np.int32)
  zeros = np.zeros(b, np.float32)
  seeds = np.zeros(b, np.uint32)
  counters = np.zeros(b, np.int32)
  variants = {"distinct": np.arange(b, dtype=np.int32),
              "one adapter": np.zeros(b, np.int32),
              "base only": np.full(b, -1, np.int32)}

  def runner(slot_ids):
    def step():
      t = time.perf_counter()
      nxt, _, kv[0], kv[1] = decoder.decode_step(
          lay, params, cache.slots, kv[0], kv[1], tokens, positions, tables,
          slot_ids, zeros, seeds, counters)
      jax.block_until_ready(nxt)
      return time.perf_counter() - t
    return step

  setup = time.perf_counter() - t0
  med = interleaved_medians({k: runner(v) for k, v in variants.items()},
                            args.rounds)
  one = med["one adapter"]
  print(f"decode step, hidden {cfg.hidden}, {cfg.num_layers} layers, rank "
        f"{cfg.lora_rank}, batch {b}, context {args.context}, {args.dtype}, "
        f"{jax.devices()[0].platform}; medians of {args.rounds} interleaved "
        f"rounds (setup {setup:.0f} s)")
  for k, v in med.items():
    print(f"  {k:<12} {v * 1e3:9.2f} ms   {v / one:5.2f}x one adapter")
  result = dict(config=vars(args), platform=jax.devices()[0].platform,
                device=str(jax.devices()[0].device_kind),
                median_seconds=med,
                distinct_over_one_adapter=med["distinct"] / one,
                one_adapter_over_base=one / med["base only"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
