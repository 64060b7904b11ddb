"""The CPU benchmark suite: the small GPT, MoE and Wide-ResNet configs, a
wide-MLP and a deep narrow GPT, on 8 simulated devices, every plan side by
side (timed in interleaved rounds), JSON + PNG per config, and a summary of
the suite's self-checks on measured times.

Each config runs in a process of its own (``--in-process`` runs them all in
this one): a step's time on simulated devices depends on what the process
ran before it (allocator and thread-pool state), and a config measured
after six others is not measured like one measured first.

  python benchmarks/cpu_suite.py [--out benchmarks/results] [--steps 7]
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("ALPA_PY_QUIET", "1")

from alpa_py.bench import suite  # noqa: E402

CONFIGS = (("gpt", "tiny"), ("gpt", "small"), ("moe", "tiny"), ("moe", "small"),
           ("wresnet", "tiny"), ("gpt", "wide"), ("gpt", "deep"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench_out")
  ap.add_argument("--steps", type=int, default=7)
  ap.add_argument("--profiles", default="cpu,cpu:calibrated,"
                  "a100_8x_nvlink_100gbps,v100_8x_nvlink_25gbps")
  ap.add_argument("--configs", default=",".join(f"{s}:{n}" for s, n in CONFIGS))
  ap.add_argument("--auto-profile", default="cpu:calibrated",
                  help="the profile the auto plan is planned under")
  ap.add_argument("--in-process", action="store_true",
                  help="run every config in this process")
  args = ap.parse_args()
  t0 = time.perf_counter()
  profiles = tuple(args.profiles.split(","))
  results = []
  keys = args.configs.split(",")
  for key in keys:
    s, name = key.split(":")
    if len(keys) > 1 and not args.in_process:
      cmd = [sys.executable, os.path.abspath(__file__), "--configs", key,
             "--out", args.out, "--steps", str(args.steps), "--profiles",
             args.profiles, "--auto-profile", args.auto_profile]
      subprocess.run(cmd, check=True,
                     env=dict(os.environ, _ALPA_PY_SUITE_CHILD="1"))
      with open(os.path.join(args.out, f"{s}_{name}.json")) as f:
        results.append(json.load(f))
      continue
    result = suite.run_suite(s, name, steps=args.steps, profiles=profiles,
                             auto_profile=args.auto_profile)
    results.append(result)
    print(suite.table(result))
    print("wrote " + ", ".join(suite.save(result, args.out)) + "\n", flush=True)
  if os.environ.get("_ALPA_PY_SUITE_CHILD"):
    return 0  # the parent prints the summary
  print(summary(results, profiles))
  print(f"whole CPU suite: {time.perf_counter() - t0:.0f} s")
  return 0


def summary(results, profiles) -> str:
  """One line per config (auto vs the best measured baseline, memory), and
  per profile the prediction figures over every plan of every config."""
  lines = ["config        auto/best measured (best)     auto mem <= data"]
  for r in results:
    c = r["checks"]
    lines.append(f"{r['suite']}:{r['config']:<8} "
                 f"{c['auto_measured_over_best_baseline']:6.2f}x "
                 f"({c['best_measured_baseline']:<8})           "
                 f"{c['auto_memory_le_data_parallel']}")
  for prof in profiles:
    for tag, what in (("", "ILP objective"), ("compiled:", "compiled program")):
      name = f"{tag}{prof}"
      agree = sum(r["checks"][f"order_agreement[{name}]"][0] for r in results)
      total = sum(r["checks"][f"order_agreement[{name}]"][1] for r in results)
      errs = sorted(abs(v - 1) for r in results for v in
                    r["checks"][f"predicted_over_measured[{name}]"].values())
      med = errs[len(errs) // 2] if len(errs) % 2 else \
          (errs[len(errs) // 2 - 1] + errs[len(errs) // 2]) / 2
      lines.append(f"{prof} ({what}): order agrees on {agree}/{total} plan "
                   f"pairs >10% apart measured; median |pred/meas - 1| "
                   f"{med:.2f} over {len(errs)} plans")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
