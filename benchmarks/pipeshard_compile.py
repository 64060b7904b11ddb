"""Compile-time report of PipeshardParallel with automatic stages.

An 8-layer GPT on 8 simulated CPU devices, ``AutoStageOption`` (profiled or
modelled stage costs): how long layer clustering, stage costing (ILP model
and/or compiling + timing each candidate stage), the stage DP and the final
compilation took, then one training step checked against a single device.

  python benchmarks/pipeshard_compile.py [--cost-source profile|model]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

import alpa_py  # noqa: E402
from alpa_py.models import GPT, GPTConfig  # noqa: E402
from alpa_py.models.gpt import lm_loss  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--hidden", type=int, default=256)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--micro-batches", type=int, default=4)
  ap.add_argument("--cost-source", default="profile", choices=("profile", "model"))
  ap.add_argument("--layer-option", default="manual", choices=("manual", "auto"))
  args = ap.parse_args()
  cfg = GPTConfig(vocab_size=1024, seq_len=args.seq, hidden=args.hidden,
                  num_heads=8, num_layers=args.layers,
                  pipeline_boundaries=args.layer_option == "manual")
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq), 0,
                              cfg.vocab_size)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(1), tokens),
      tx=optax.adamw(1e-3))

  def step(state, tokens):
    loss, grads = alpa_py.value_and_grad(
        lambda p: lm_loss(state.apply_fn(p, tokens), tokens))(state.params)
    return state.apply_gradients(grads=grads), loss

  layer_option = (alpa_py.ManualLayerOption() if args.layer_option == "manual"
                  else alpa_py.AutoLayerOption(args.layers))
  method = alpa_py.PipeshardParallel(
      num_micro_batches=args.micro_batches, layer_option=layer_option,
      stage_option=alpa_py.AutoStageOption(cost_source=args.cost_source))
  par = alpa_py.parallelize(step, method=method)
  t0 = time.perf_counter()
  ex = par.get_executable(state, tokens)
  total = time.perf_counter() - t0
  print(ex.plan)
  report = dict(ex.plan.compile_report)
  print(f"\nGPT {args.layers} layers (hidden {args.hidden}, seq {args.seq}, batch "
        f"{args.batch}, {args.micro_batches} micro-batches) on "
        f"{jax.device_count()} devices, AutoStageOption({args.cost_source}), "
        f"{args.layer_option} layers")
  for key in ("layer_clustering_seconds", "stage_model_seconds",
              "stage_profile_seconds", "stage_dp_seconds",
              "stage_construction_seconds", "stage_compile_seconds"):
    if key in report:
      print(f"  {key:<28} {report[key]:8.2f}")
  for key in ("stage_candidates_modelled", "stage_candidates_profiled"):
    if key in report:
      print(f"  {key:<28} {report[key]:8d}")
  print(f"  {'total get_executable':<28} {total:8.2f}")
  ref_state, ref_loss = jax.jit(step)(state, tokens)
  t0 = time.perf_counter()
  new_state, loss = par(state, tokens)
  print(f"  first step {time.perf_counter() - t0:.2f} s: loss {float(loss):.6f} "
        f"(single device {float(ref_loss):.6f}); peak live activations "
        f"{ex.last_run_stats.peak_activation_bytes / 2**20:.2f} MiB")
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(new_state.params),
                             jax.tree_util.tree_leaves(ref_state.params)))
  print(f"  max |param difference| after 1 step: {diff:.2e}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
