"""The CPU benchmark suite: the small GPT, MoE and Wide-ResNet configs on 8
simulated devices, every plan side by side, JSON + PNG per config.

  python benchmarks/cpu_suite.py [--out benchmarks/results] [--steps 5]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("ALPA_PY_QUIET", "1")

from alpa_py.bench import suite  # noqa: E402

CONFIGS = (("gpt", "small"), ("moe", "small"), ("wresnet", "tiny"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="bench_out")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--profiles", default="cpu,a100_8x_nvlink_100gbps,"
                  "v100_8x_nvlink_25gbps")
  args = ap.parse_args()
  t0 = time.perf_counter()
  for s, name in CONFIGS:
    result = suite.run_suite(s, name, steps=args.steps,
                             profiles=tuple(args.profiles.split(",")))
    print(suite.table(result))
    print("wrote " + ", ".join(suite.save(result, args.out)) + "\n", flush=True)
  print(f"whole CPU suite: {time.perf_counter() - t0:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
