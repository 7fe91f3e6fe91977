#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then the benchmark table (project and peers side by
# side), everything written under $OUT (default ./gpu_out). Run from the repo root:
#   bash bench/gpu_run.sh                       # full: all GPU tests + all benchmarks
#   SKIP_BENCH=1 bash bench/gpu_run.sh          # tests only;  SKIP_TESTS=1: benchmarks only
#   TESTS_K="130x64 and bf16" BENCH_ARGS=--quick bash bench/gpu_run.sh   # a subset
# (on the lent H100 the full run is two calls of < 10 min: SKIP_BENCH=1, then SKIP_TESTS=1)
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
rc=0
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q -n "${TEST_WORKERS:-12}" tests/test_producers.py tests/test_consumers.py tests/test_bridge.py \
      tests/test_contract.py tests/test_torch_ops.py tests/test_layers.py tests/test_mlp.py \
      ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider 2>&1 | grep -v "^E1124\|Source Location\|cuda_status" \
      > "$OUT/gpu_tests.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  tail -15 "$OUT/gpu_tests.log"
  python3 bench/bridge_gpu.py --out "$OUT/bridge_gpu.json" 2>&1 | tail -15 || rc=1
  python3 bench/sharding_gpu.py --out "$OUT/sharding_gpu.json" 2>&1 | tail -15 || rc=1
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  python3 -m quantact_jax.bench.producers --out "$OUT/producers.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_producers.log" | tail -30 || rc=1
  python3 -m quantact_jax.bench.consumers --out "$OUT/consumers.json" ${CONSUMER_ARGS:-} 2>&1 | grep -v '^{' | tail -12 || rc=1
  python3 -m quantact_jax.bench.block --out "$OUT/block.json" 2>&1 | tail -20 || rc=1
  python3 bench/torch_ops_gpu.py --out "$OUT/torch_ops_gpu.json" 2>&1 | tail -20 || rc=1
fi
exit $rc
