"""``alpa-py``: the command line.

  alpa-py demo   train a small model with a method on simulated devices and
                 check it against the single-device step
  alpa-py plan   compile a step and print its sharding plan (no training)
  alpa-py bench  compare plans on a benchmark config (measured + predicted),
                 or simulate large configs on GPU clusters (--simulate)
  alpa-py serve  serve a multi-LoRA GPT over an OpenAI-compatible HTTP API
  alpa-py serve-sim  simulate a multi-LoRA serving cluster's policies
  alpa-py serve-plan  plan a serving workflow's variants and workers
                 (JellyBean's heuristic beside the exact MILP)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

MODELS = ("gpt", "mlp", "moe", "conv")
METHODS = ("shard", "data", "zero2", "zero3", "pipeshard")


def _setup_devices(n: int) -> None:
  """Simulated CPU devices; must run before JAX's backend starts (XLA reads
  the flag when the first device is asked for, not at import)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                               f"{n}").strip()


def _mesh(text: str | None):
  if not text:
    return None
  try:
    return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
  except ValueError:
    raise SystemExit(f"--mesh (={text!r}) must look like 8 or 2,4")


def _build(args):
  """(state, batch, step) of the chosen model; plain Flax + Optax."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax.training import train_state

  import alpa_py
  from alpa_py import models
  from alpa_py.models.gpt import lm_loss

  key = jax.random.PRNGKey(args.seed)
  if args.model == "gpt":
    cfg = models.GPTConfig(vocab_size=args.vocab, seq_len=args.seq,
                           hidden=args.hidden, num_heads=args.heads,
                           num_layers=args.layers,
                           pipeline_boundaries=args.method == "pipeshard")
    model = models.GPT(cfg)
    batch = {"x": jax.random.randint(key, (args.batch, args.seq), 0, args.vocab)}
    loss_fn = lambda logits, b: lm_loss(logits, b["x"])
  elif args.model == "moe":
    model = models.MoEModel(vocab_size=args.vocab, hidden=args.hidden,
                            num_experts=8, num_layers=args.layers)
    batch = {"x": jax.random.randint(key, (args.batch, args.seq), 0, args.vocab)}
    loss_fn = lambda logits, b: lm_loss(logits, b["x"])
  elif args.model == "mlp":
    model = models.MLP([args.hidden] * args.layers + [16])
    batch = {"x": jax.random.normal(key, (args.batch, 64)),
             "y": jax.random.normal(jax.random.PRNGKey(1), (args.batch, 16))}
    loss_fn = lambda out, b: jnp.mean((out - b["y"]) ** 2)
  else:
    model = models.ConvNet(channels=args.hidden // 4)
    batch = {"x": jax.random.normal(key, (args.batch, 16, 16, 3)),
             "y": jax.random.randint(jax.random.PRNGKey(1), (args.batch,), 0, 10)}
    loss_fn = lambda out, b: optax.softmax_cross_entropy_with_integer_labels(
        out, b["y"]).mean()
  params = model.init(jax.random.PRNGKey(0), batch["x"])
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=optax.adamw(args.lr))

  def train_step(state, batch):
    def loss_of(p):
      return loss_fn(state.apply_fn(p, batch["x"]), batch)
    loss, grads = alpa_py.value_and_grad(loss_of)(state.params)
    return state.apply_gradients(grads=grads), loss

  return state, batch, train_step


def _method(args):
  import alpa_py
  if args.method == "pipeshard":
    opt = alpa_py.AutoShardingOption(cost_profile=args.profile,
                                     memory_budget_per_device=args.memory_budget)
    manual = args.model == "gpt"
    return alpa_py.PipeshardParallel(
        num_micro_batches=args.micro_batches or 1,
        layer_option=(alpa_py.ManualLayerOption() if manual else
                      alpa_py.AutoLayerOption(args.layers)),
        stage_option=(alpa_py.UniformStageOption(num_stages=args.stages)
                      if args.stages else
                      alpa_py.AutoStageOption(cost_source="model")),
        pipeline_schedule=args.schedule,
        default_auto_sharding_option=opt)
  cls = {"shard": alpa_py.ShardParallel, "data": alpa_py.DataParallel,
         "zero2": alpa_py.Zero2Parallel, "zero3": alpa_py.Zero3Parallel}[args.method]
  opt = alpa_py.AutoShardingOption(
      cost_profile=args.profile,
      memory_budget_per_device=args.memory_budget)
  return cls(mesh_shape=_mesh(args.mesh), auto_sharding_option=opt,
             num_micro_batches=args.micro_batches)


def cmd_demo(args) -> int:
  import jax
  import numpy as np

  import alpa_py
  print(f"alpa_py demo: {args.model} on {jax.device_count()} "
        f"{jax.devices()[0].platform} devices, method {args.method}")
  state, batch, step = _build(args)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  print(f"model parameters: {n_params:,}")
  par = alpa_py.parallelize(step, method=_method(args))
  t0 = time.perf_counter()
  ex = par.get_executable(state, batch)
  print(f"compiled in {time.perf_counter() - t0:.1f} s")
  if hasattr(ex, "solve_stats"):
    print(f"ILP {ex.solve_stats.status}, {ex.solve_stats.num_variables} "
          f"variables, solved in {ex.solve_stats.solve_seconds:.2f} s")
  print(ex.plan)
  mem = ex.memory_per_device()
  mem = mem if isinstance(mem, tuple) else (mem,)
  print("memory per device (XLA): " + ", ".join(
      f"{m / 2**20:.2f} MiB" for m in mem) + (" (per stage)" if len(mem) > 1 else ""))
  ref_step = jax.jit(step)
  ref, par_state = state, state
  worst = 0.0
  for i in range(args.steps):
    t0 = time.perf_counter()
    par_state, loss = par(par_state, batch)
    loss = float(loss)
    dt = time.perf_counter() - t0
    ref, ref_loss = ref_step(ref, batch)
    ref_loss = float(ref_loss)
    print(f"step {i}: loss {loss:.6f} (single device {ref_loss:.6f})  "
          f"{dt * 1e3:.1f} ms")
    worst = max(worst, abs(loss - ref_loss) / max(abs(ref_loss), 1e-12))
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree_util.tree_leaves(par_state.params),
                           jax.tree_util.tree_leaves(ref.params))]
  print(f"max |param difference| vs single device after {args.steps} steps: "
        f"{max(diffs):.2e}; max relative loss difference {worst:.2e}")
  ok = worst <= 1e-4
  print("OK: matches the single-device step" if ok else
        "MISMATCH: differs from the single-device step")
  return 0 if ok else 1


def cmd_plan(args) -> int:
  import jax

  import alpa_py
  state, batch, step = _build(args)
  par = alpa_py.parallelize(step, method=_method(args))
  t0 = time.perf_counter()
  ex = par.get_executable(state, batch)
  total = time.perf_counter() - t0
  print(ex.plan)
  if not hasattr(ex, "solve_stats"):
    print(f"compile: {total:.1f} s; memory per device per stage: "
          f"{[round(m / 2**20, 2) for m in ex.memory_per_device()]} MiB")
    return 0
  s = ex.solve_stats
  print(f"\nILP: {s.status}, {s.num_nodes} nodes, {s.num_edges} edges, "
        f"{s.num_variables} variables, {s.num_constraints} constraints, "
        f"solved in {s.solve_seconds:.2f} s; mesh candidates: "
        + ", ".join(f"{m}: {o * 1e3:.3f} ms" for m, o in s.mesh_candidates))
  print(f"compile (trace + ILP + XLA): {total:.1f} s; memory per device "
        f"{ex.memory_per_device() / 2**20:.2f} MiB on {jax.device_count()} devices")
  return 0


def _simulate(args) -> int:
  """``bench --simulate``: GPT, MoE and Wide-ResNet planned hierarchically
  (stages, submeshes, per-stage ILP) beside their baselines."""
  import json
  import os
  import sys
  import time

  from alpa_py.bench import simulate_hierarchical as hier
  from alpa_py.bench.hierarchical import submeshes
  from alpa_py.bench.progress import Bar
  from alpa_py.compiler.cluster_env import get_profile
  gpus = [int(g) for g in args.gpus.split(",")]
  per_node = get_profile(args.simulate).devices_per_node
  try:  # every count checked before any is planned
    for g in gpus:
      submeshes(g, per_node)
  except ValueError as e:
    print(f"alpa-py bench: {e}", file=sys.stderr)
    return 2
  name = args.config if args.config and not args.weak_scaling else None
  rows = []
  bar = Bar(len(gpus), f"simulate {args.suite} on {args.simulate}")
  for g in gpus:
    t0 = time.perf_counter()
    rows.append(hier.hierarchical_one(args.suite, g, args.simulate, name=name,
                                      fusion_aware=not args.per_op_bytes))
    rows[-1]["wall_seconds"] = time.perf_counter() - t0
    bar.step(f"{g} GPUs")
  print(hier.table(rows))
  stem = os.path.join(args.out, f"simulate_{args.suite}_{args.simulate}"
                      + ("_per_op" if args.per_op_bytes else ""))
  with open(stem + ".json", "w") as f:
    json.dump(rows, f, indent=1, default=str)
  print(f"wrote {stem}.json")
  if not args.no_plot:
    print(f"wrote {hier.plot(rows, stem + '.png')}")
  return 0


def cmd_bench(args) -> int:
  import os

  os.environ.setdefault("ALPA_PY_QUIET", "1")  # the bars report progress
  from alpa_py.bench import suite
  os.makedirs(args.out, exist_ok=True)
  if args.simulate:
    return _simulate(args)
  if args.quick:
    args.config, args.steps = "tiny", 2
  result = suite.run_suite(args.suite, args.config or "tiny",
                           devices=args.devices, steps=args.steps,
                           profiles=tuple(args.profiles.split(",")))
  print(suite.table(result))
  print("wrote " + ", ".join(suite.save(result, args.out, plot=not args.no_plot)))
  return 0


def cmd_serve_sim(args) -> int:
  from alpa_py.serve import sim_report
  try:
    result = sim_report.compare(
        args.workload, args.gpus,
        None if args.policy == "all" else args.policy.split(","),
        requests=args.requests, seed=args.seed, cv=args.cv,
        max_batch=args.max_batch)
  except ValueError as e:
    print(f"alpa-py serve-sim: {e}", file=sys.stderr)
    return 2
  print(sim_report.table(result))
  print("wrote " + ", ".join(sim_report.save(result, args.out,
                                             not args.no_plot)))
  return 0


def cmd_serve_plan(args) -> int:
  import json as json_lib

  from alpa_py.serve import planner
  try:
    problem = planner.load_jellybean(args.inputs, comm_scale=args.comm_scale)
    print(f"inputs: {args.inputs}")
    print(f"  operators {', '.join(problem.operators)}; "
          f"{len(problem.workers)} workers in "
          f"{1 + max(problem.tiers.values())} tiers; accuracy threshold "
          f"{problem.threshold} at {problem.sink}")
    plans = [planner.optimal_plan(problem, time_limit=args.time_limit)]
    try:
      plans.append(planner.jellybean_plan(problem))
    except planner.PlanError as e:  # the baseline may fail where the MILP
      print(f"  (the JellyBean heuristic: {e})")  # finds a plan
  except planner.PlanError as e:
    print(f"alpa-py serve-plan: {e}", file=sys.stderr)
    return 2
  for plan in plans:
    print(plan)
  if len(plans) == 2:
    print(f"MILP / JellyBean heuristic total cost: "
          f"{plans[0].total_cost / plans[1].total_cost:.4f}")
  os.makedirs(args.out, exist_ok=True)
  names = ("plan.json", "jellybean_plan.json")
  for plan, name in zip(plans, names):
    with open(os.path.join(args.out, name), "w") as f:
      json_lib.dump(plan.to_json(), f, indent=2, sort_keys=True)
  print("wrote " + ", ".join(os.path.join(args.out, n)
                             for n in names[:len(plans)]))
  return 0


def cmd_serve(args) -> int:
  from alpa_py.serve import checkpoint, make_router
  import importlib.util
  missing = [m for m in ("fastapi", "uvicorn")
             if importlib.util.find_spec(m) is None]
  if missing:
    print(f"alpa-py serve: {', '.join(missing)} not installed; install the "
          "HTTP dependencies with `pip install alpa_py[serve]`",
          file=sys.stderr)
    return 2
  from alpa_py.serve import http
  try:
    cfg = checkpoint.load_config(args.model_config)
    if args.adapters:
      params = checkpoint.load_params(args.adapters, cfg)
      print(f"loaded {cfg.lora_adapters} adapters from {args.adapters}")
    else:
      params = checkpoint.init_params(cfg, args.seed)
      print("no --adapters: serving freshly initialised weights")
    router = make_router(cfg, params, args.engines, args.cluster, args.policy,
                         max_batch=args.max_batch, page_size=args.page_size)
  except ValueError as e:
    print(f"alpa-py serve: {e}", file=sys.stderr)
    return 2
  print(f"{args.engines} engine(s) ({args.cluster}), policy {args.policy}; "
        f"models: {', '.join(http.model_names(cfg.lora_adapters)[:4])} ...; "
        f"http://{args.host}:{args.port}/v1/completions")
  try:
    http.serve_forever(router, args.host, args.port)
  finally:
    router.close()
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="alpa-py", description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_ in (("demo", "train on simulated devices, check vs 1 device"),
                      ("plan", "print the sharding plan of a step")):
    p = sub.add_parser(name, help=help_)
    p.add_argument("--model", choices=MODELS, default="gpt")
    p.add_argument("--method", choices=METHODS, default="shard")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices (ignored on a GPU machine)")
    p.add_argument("--mesh", default=None, help="e.g. 2,4 (default: search)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--stages", type=int, default=None,
                   help="pipeshard: uniform stages (default: stage DP)")
    p.add_argument("--schedule", default="1f1b", choices=("1f1b", "gpipe"))
    p.add_argument("--memory-budget", type=float, default=None,
                   help="bytes per device")
    p.add_argument("--profile", default="cpu",
                   help="cpu, cpu:calibrated, v100_8x_nvlink_25gbps, "
                   "a100_8x_nvlink_100gbps, h100_8x_nvlink_400gbps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=5)
  b = sub.add_parser("bench", help="benchmark suite (measured + predicted)")
  b.add_argument("--suite", choices=("gpt", "moe", "wresnet"), default="gpt")
  b.add_argument("--config", default=None, help="tiny, small, or a named size "
                 "(350M ... 39B); with --simulate: default weak scaling")
  b.add_argument("--devices", type=int, default=8)
  b.add_argument("--steps", type=int, default=5, help="timed steps per plan")
  b.add_argument("--profiles", default="cpu,a100_8x_nvlink_100gbps,"
                 "v100_8x_nvlink_25gbps")
  b.add_argument("--simulate", default=None, help="a GPU profile: plan the "
                 "large configs on simulated clusters, nothing allocated")
  b.add_argument("--gpus", default="1,8,16,32,64")
  b.add_argument("--weak-scaling", action="store_true",
                 help="with --simulate: the published model size per GPU count")
  b.add_argument("--per-op-bytes", action="store_true",
                 help="with --simulate: price every non-matmul op at every "
                 "byte it moves (no fusion; the default prices each fused "
                 "region, as XLA runs them on a GPU)")
  b.add_argument("--quick", action="store_true", help="tiny config, 2 steps")
  b.add_argument("--no-plot", action="store_true")
  b.add_argument("--out", default="bench_out")
  v = sub.add_parser("serve-sim", help="simulate a multi-LoRA serving "
                     "cluster: scheduling policies side by side on one trace")
  v.add_argument("--workload", default="skewed", help="distinct, uniform, "
                 "skewed, identical (Punica) or slora (S-LoRA)")
  v.add_argument("--gpus", type=int, default=16)
  v.add_argument("--policy", default="all", help="all, or a comma list of: "
                 "punica, round-robin, least-loaded, one-adapter-per-batch, "
                 "adapter-affinity")
  v.add_argument("--requests", type=int, default=2000)
  v.add_argument("--max-batch", type=int, default=32)
  v.add_argument("--cv", type=float, default=1.0,
                 help="arrival gaps' coefficient of variation (1: Poisson)")
  v.add_argument("--seed", type=int, default=0)
  v.add_argument("--no-plot", action="store_true")
  v.add_argument("--out", default="bench_out")
  q = sub.add_parser("serve-plan", help="plan a serving workflow's model "
                     "variants and workers at minimum cost (JellyBean's "
                     "input format)")
  q.add_argument("--inputs", default=None, help="folder of JellyBean "
                 "optimizer inputs (default: its VQA example, embedded)")
  q.add_argument("--out", default="plan_out")
  q.add_argument("--time-limit", type=float, default=10.0,
                 help="MILP time limit, seconds")
  q.add_argument("--comm-scale", type=float, default=0.1,
                 help="multiplies every link price (JellyBean's "
                 "COMM_COST_SCALING_FACTOR; 0.1 in its VQA example)")
  s = sub.add_parser("serve", help="serve a multi-LoRA GPT over an "
                     "OpenAI-compatible HTTP API")
  s.add_argument("--model-config", required=True,
                 help="JSON of GPTConfig fields (lora_adapters > 0)")
  s.add_argument("--adapters", default=None, help="the orbax checkpoint "
                 "`examples/multi_lora_finetune.py --save DIR` writes")
  s.add_argument("--host", default="127.0.0.1")
  s.add_argument("--port", type=int, default=8000)
  s.add_argument("--engines", type=int, default=1, help="one per device")
  s.add_argument("--cluster", choices=("local", "ray"), default="local")
  s.add_argument("--policy", default="punica")
  s.add_argument("--max-batch", type=int, default=32)
  s.add_argument("--page-size", type=int, default=16)
  s.add_argument("--devices", type=int, default=8,
                 help="simulated CPU devices (ignored on a GPU machine)")
  s.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.command == "serve-sim":
    return cmd_serve_sim(args)
  if args.command == "serve-plan":
    if args.inputs is None:
      from alpa_py.serve.planner import VQA_EXAMPLE
      args.inputs = VQA_EXAMPLE
    return cmd_serve_plan(args)
  _setup_devices(args.devices)
  if args.command == "bench" and args.simulate and args.config is None:
    args.weak_scaling = True
  return {"demo": cmd_demo, "plan": cmd_plan, "bench": cmd_bench,
          "serve": cmd_serve}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
