"""How long the auto-sharding pass takes on a 12-layer GPT training step.

Prints, per stage, the time of: tracing, graph building, the ILP (size and
solve time) and XLA compilation, for a GPT (hidden 512, 8 heads, seq 128) on a
(2, 4) mesh of 8 simulated CPU devices.

  python benchmarks/autoshard_scale.py [--layers 12] [--mesh 2,4]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

import alpa_py  # noqa: E402
from alpa_py.compiler.graph import build_graph  # noqa: E402
from alpa_py.models import GPT, GPTConfig  # noqa: E402
from alpa_py.models.gpt import lm_loss  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--mesh", default="2,4")
  ap.add_argument("--profile", default="cpu")
  args = ap.parse_args()
  mesh = tuple(int(v) for v in args.mesh.split(","))
  cfg = GPTConfig(vocab_size=args.vocab, seq_len=args.seq, hidden=args.hidden,
                  num_heads=args.heads, num_layers=args.layers)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (args.batch, args.seq), 0,
                              args.vocab)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=model.init(jax.random.PRNGKey(1), tokens),
      tx=optax.adamw(1e-3))

  def step(state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(state.apply_fn(p, tokens), tokens))(state.params)
    return state.apply_gradients(grads=grads), loss

  t0 = time.perf_counter()
  closed = jax.make_jaxpr(step)(state, tokens)
  t_trace = time.perf_counter() - t0
  t0 = time.perf_counter()
  graph = build_graph(closed)
  t_graph = time.perf_counter() - t0
  par = alpa_py.parallelize(step, method=alpa_py.ShardParallel(
      mesh_shape=mesh, auto_sharding_option=alpa_py.AutoShardingOption(
          cost_profile=args.profile)))
  t0 = time.perf_counter()
  ex = par.get_executable(state, tokens)
  t_total = time.perf_counter() - t0
  s = ex.solve_stats
  print(f"GPT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, "
        f"seq {args.seq}, batch {args.batch}, mesh {mesh}, profile {args.profile}")
  print(f"  jaxpr: {len(closed.jaxpr.eqns)} top-level eqns; graph: "
        f"{graph.summary()}")
  print(f"  trace {t_trace:.2f} s, graph {t_graph:.2f} s")
  print(f"  ILP: {s.num_nodes} nodes, {s.num_edges} edges after simplification;"
        f" core {s.num_variables} variables, {s.num_constraints} constraints; "
        f"{s.status}; solve {s.solve_seconds:.2f} s")
  xla = ex.solve_stats.compile_seconds
  print(f"  whole get_executable (trace + pass + XLA compile): {t_total:.2f} s "
        f"(stats say {xla:.2f} s)")
  print(f"  predicted step {s.objective * 1e3:.1f} ms; memory per device "
        f"{ex.memory_per_device() / 2**20:.1f} MiB")
  t0 = time.perf_counter()
  new_state, loss = par(state, tokens)
  jax.block_until_ready(loss)
  print(f"  first step {time.perf_counter() - t0:.2f} s, loss {float(loss):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
