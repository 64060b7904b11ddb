#!/usr/bin/env bash
# The GPU checks the open issues ask for, as one script for a lent GPU
# (about 8 minutes on an H100/H200; each step has its own time limit, and
# what a step printed stays in $OUT even when a later one fails).
#
# The GPU image lacks OR-Tools (alpa_py imports it at start-up). Before the
# session's device call, fetch its wheel and the ones it needs for Python
# 3.12 into .whl (ignored by git), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .whl ortools==9.15.6755 immutabledict
# and call the device with carry [".whl"] and the command
#   bash benchmarks/gpu_checks.sh
#
# Figures written under $OUT (default ./gpu_out):
#   sparse_tests.log     the sparse kernels' tests with backend="pallas" (#17)
#   lora_tests.log       the LoRA kernel tests on the GPU (#17)
#   sparse_gpu.json      sparse step vs dense at widths up to 262,144, with the
#                        backends timed and recorded for backend="auto" (#17)
#   lora_gpu.json        LoRA device times, hidden 4096, fp16, ranks 8-64,
#                        batch 1/16/64, every popularity (#17)
#   kernel_choices.json  the records `auto` follows (copy it to
#                        alpa_py/kernels/ to ship them)
set -u -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ALPA_PY_CACHE_DIR="$OUT/cache" JAX_PLATFORMS=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# the kernel tests only (conftest needs 8 devices under JAX_PLATFORMS=cpu)
timeout 240 python3 -m pytest -q -x tests/test_sparse_neuron.py -k "pallas or \
transfer or lower" 2>&1 | tee "$OUT/sparse_tests.log"
timeout 240 python3 -m pytest -q tests/test_lora.py 2>&1 | tail -5 | tee \
  "$OUT/lora_tests.log"
for n in 128 1024; do
  timeout 150 python3 benchmarks/sparse_neurons.py --n "$n" --backend pallas \
    --record "$OUT/kernel_choices.json" --json "$OUT/sparse_gpu_n$n.json" \
    2>&1 | tail -25 | tee "$OUT/sparse_gpu_n$n.txt"
done
timeout 240 python3 benchmarks/lora_kernels.py --hidden 4096 \
  --ranks 8,16,32,64 --batches 1,16,64 --record "$OUT/kernel_choices.json" \
  --json "$OUT/lora_gpu.json" 2>&1 | tail -70 | tee "$OUT/lora_gpu.txt"
echo "done; figures in $OUT"
