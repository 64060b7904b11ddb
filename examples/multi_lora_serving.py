"""Fine-tune 8 LoRA adapters of one base GPT, then serve them all from one
engine in mixed batches.

Training is ``multi_lora_finetune.py``'s (adapter a learns sequences that
count up in steps of a + 1). The engine then answers a request per adapter
(and one for the base model) in one continuous batch of 4 rows with 4
adapter slots on the device: each prompt is the start of its adapter's
sequence, and each answer is checked against the full model's greedy
decoding of that request alone.

  python examples/multi_lora_serving.py [--steps 60]
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from alpa_py import serve  # noqa: E402
from alpa_py.models import GPT  # noqa: E402
import multi_lora_finetune as finetune  # noqa: E402


def greedy_alone(model, params, prompt, adapter, new):
  """The full (uncached) model's greedy continuation of one request."""
  seq = list(prompt)
  for _ in range(new):
    logits = model.apply(params, np.array([seq], np.int32),
                         np.array([adapter], np.int32))
    seq.append(int(np.argmax(logits[0, -1])))
  return seq[len(prompt):]


def serve_adapters(state, vocab: int, prompt_len: int = 4, new: int = 8,
                   verbose: bool = True):
  """One request per adapter (plus the base model) through one engine of
  4 rows, so requests join as others leave; returns whether every answer
  equals the full model's greedy decoding of that request alone."""
  model = GPT(state.apply_fn.__self__.cfg)
  engine = serve.Engine(model, state.params, max_batch=4, page_size=4,
                        adapter_cache=4)
  reqs = []
  for a in range(-1, finetune.NUM_ADAPTERS):
    step = (a if a >= 0 else 0) + 1
    start = 3 * (a + 2)
    prompt = [(start + i * step) % vocab for i in range(prompt_len)]
    reqs.append(serve.Request(prompt=prompt, adapter=a, max_new_tokens=new))
  outs = engine.generate(reqs)
  same = True
  for req, out in zip(reqs, outs):
    ref = greedy_alone(model, state.params, req.prompt, req.adapter, new)
    same &= out == ref
    if verbose:
      name = "base" if req.adapter < 0 else f"adapter {req.adapter}"
      print(f"{name:>10}: prompt {list(req.prompt)} -> {out}"
            f"{'' if out == ref else f'  (full model: {ref})'}")
  if verbose:
    print("engine:", engine.stats)
  return same


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=60)
  args = ap.parse_args()
  first, last, same, state = finetune.train(args.steps, verbose=False)
  print(f"trained {args.steps} steps: per-adapter loss "
        f"{np.mean(first):.3f} -> {np.mean(last):.3f}")
  same = serve_adapters(state, vocab=64)
  print("every answer equals the full model's greedy decoding:", same)
  return 0 if same else 1


if __name__ == "__main__":
  sys.exit(main())
