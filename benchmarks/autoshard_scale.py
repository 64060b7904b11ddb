"""How the auto-sharding ILP's solve time grows with the number of layers.

For GPTs of 2 to 24 layers (hidden 512, 8 heads, seq 128, batch 8, vocab
1024) on a (2, 4) mesh, plans the training step twice per size: with the
full ILP (``tie_repeated_layers=False``) and with the repeated layers tied
(``ilp_symmetry``, the default), side by side. Prints, per size, the median
ILP solve time of each over ``--repeats`` solves, the ILP's variables, and
the objective ratio tied / full (where the full ILP solved to optimality), then
the log-log slope of solve time vs layers of both. Writes
``benchmarks/results/autoshard_scale.json``.

Nothing is compiled or run: the plans are priced by
``alpa_py.driver.analysis.StepAnalysis`` under a GPU profile.

  python benchmarks/autoshard_scale.py [--layers 2,4,8,12,16,24] [--mesh 2,4]
      [--profile a100_8x_nvlink_100gbps] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("ALPA_PY_QUIET", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

import alpa_py  # noqa: E402
from alpa_py.driver.analysis import StepAnalysis  # noqa: E402
from alpa_py.models import GPT, GPTConfig  # noqa: E402
from alpa_py.models.gpt import lm_loss  # noqa: E402

_RESULTS = os.path.join(os.path.dirname(__file__), "results",
                        "autoshard_scale.json")


def gpt_analysis(layers: int, args) -> StepAnalysis:
  """The traced training step of a GPT with ``layers`` blocks."""
  cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, hidden=args.hidden,
                  num_heads=args.heads, num_layers=layers)
  model = GPT(cfg)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), np.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(1),
                          jax.numpy.zeros((args.batch, args.seq), np.int32))
  state = jax.eval_shape(lambda p: train_state.TrainState.create(
      apply_fn=model.apply, params=p, tx=optax.adamw(1e-3)), params)

  def step(state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(model.apply(p, tokens), tokens))(state.params)
    return state.apply_gradients(grads=grads), loss

  return StepAnalysis(step, (state, tokens), batch_argnums=(1,),
                      num_devices=8)


def solve(analysis: StepAnalysis, mesh, profile: str, tie: bool,
          time_limit_s: float):
  method = alpa_py.ShardParallel(
      mesh_shape=mesh, auto_sharding_option=alpa_py.AutoShardingOption(
          tie_repeated_layers=tie, solver_time_limit_s=time_limit_s))
  return analysis.solve_method(method, profile)


def slope(layers, seconds) -> float:
  """Least-squares slope of log(seconds) vs log(layers)."""
  return float(np.polyfit(np.log(layers), np.log(seconds), 1)[0])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", default="2,4,8,12,16,24")
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--mesh", default="2,4")
  ap.add_argument("--profile", default="a100_8x_nvlink_100gbps")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--time-limit", type=float, default=60.0)
  ap.add_argument("--out", default=_RESULTS)
  args = ap.parse_args()
  mesh = tuple(int(v) for v in args.mesh.split(","))
  sizes = [int(v) for v in args.layers.split(",")]
  print(f"GPT hidden {args.hidden}, {args.heads} heads, seq {args.seq}, "
        f"batch {args.batch}, vocab {args.vocab}; mesh {mesh}, profile "
        f"{args.profile}; median of {args.repeats} solves, time limit "
        f"{args.time_limit:.0f} s")
  print(f"{'layers':>6} {'full s':>8} {'tied s':>8} {'speedup':>8} "
        f"{'vars full':>9} {'vars tied':>9} {'full status':>11} "
        f"{'obj tied/full':>13}")
  rows = []
  for layers in sizes:
    t0 = time.perf_counter()
    analysis = gpt_analysis(layers, args)
    t_trace = time.perf_counter() - t0
    runs = {}
    for tie in (False, True):
      sols = [solve(analysis, mesh, args.profile, tie, args.time_limit)
              for _ in range(args.repeats)]
      runs[tie] = sols
    full, tied = runs[False][0], runs[True][0]
    full_s = statistics.median(s.solve_seconds for s in runs[False])
    tied_s = statistics.median(s.solve_seconds for s in runs[True])
    ratio = tied.objective / full.objective if full.status == "OPTIMAL" \
        else None
    row = dict(layers=layers, full_seconds=full_s, tied_seconds=tied_s,
               full_all=[s.solve_seconds for s in runs[False]],
               tied_all=[s.solve_seconds for s in runs[True]],
               full_objective=full.objective, tied_objective=tied.objective,
               full_status=full.status, tied_status=tied.status,
               objective_ratio=ratio, num_nodes=full.num_nodes,
               full_variables=full.num_variables,
               tied_variables=tied.num_variables,
               trace_seconds=t_trace)
    rows.append(row)
    print(f"{layers:>6} {full_s:>8.2f} {tied_s:>8.2f} "
          f"{full_s / tied_s:>7.1f}x {full.num_variables:>9} "
          f"{tied.num_variables:>9} "
          f"{full.status:>11} "
          f"{'-' if ratio is None else f'{ratio:.6f}':>13}", flush=True)
  ls = [r["layers"] for r in rows]
  result = dict(
      config=dict(vars(args), mesh=list(mesh)), rows=rows,
      full_slope=slope(ls, [r["full_seconds"] for r in rows]),
      tied_slope=slope(ls, [r["tied_seconds"] for r in rows]))
  print(f"log-log slope of solve time vs layers ({ls[0]}-{ls[-1]}): full "
        f"{result['full_slope']:.2f}, tied {result['tied_slope']:.2f}")
  ratios = [r["objective_ratio"] for r in rows
            if r["objective_ratio"] is not None]
  if ratios:
    print(f"objective tied / full: {min(ratios):.6f} .. {max(ratios):.6f} "
          f"over {len(ratios)} sizes the full ILP solved to optimality")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
