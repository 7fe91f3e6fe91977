#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then the benchmark table (project and peers side by
# side), everything written under $OUT (default ./gpu_out). Run from the repo root:
#   bash bench/gpu_run.sh                       # full: all GPU tests + all benchmarks
#   TESTS_K="130x64 and bf16" BENCH_ARGS=--quick bash bench/gpu_run.sh   # a subset
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
rc=0
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -n "${TEST_WORKERS:-8}" tests/test_producers.py tests/test_consumers.py tests/test_bridge.py tests/test_contract.py \
      ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || rc=1
fi
python3 bench/bridge_gpu.py --out "$OUT/bridge_gpu.json" 2>&1 | tail -15 || rc=1
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m quantact_jax.bench.producers --out "$OUT/producers.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_producers.log" | tail -30 || rc=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ] && [ "${SKIP_CONSUMERS:-0}" != 1 ]; then
  python3 -m quantact_jax.bench.consumers --out "$OUT/consumers.json" ${CONSUMER_ARGS:-} 2>&1 | tee "$OUT/bench_consumers.log" | tail -12 || rc=1
fi
exit $rc
