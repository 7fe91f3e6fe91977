#!/usr/bin/env bash
# One call on a GPU machine: the GPU tests, then the benchmark table (project and peers side by
# side), everything written under $OUT (default ./gpu_out). Run from the repo root:
#   bash bench/gpu_run.sh                       # full: all GPU tests + all benchmarks
#   SKIP_BENCH=1 bash bench/gpu_run.sh          # tests only;  SKIP_TESTS=1: benchmarks only
#   TESTS_K="130x64 and bf16" BENCH_ARGS=--quick bash bench/gpu_run.sh   # a subset
#   SKIP_TESTS=1 BENCHES="decode block" bash bench/gpu_run.sh            # some benchmarks
#   ONLY_SHARDING=1 BENCHES=tp bash bench/gpu_run.sh    # multi-GPU: the sharding checks + the TP block bench
# benchmarks: producers consumers decode blockscaled dequant block torch_ops tp (default: all)
# tests phase: with more than one GPU also tests/sharding_cases.py on a mesh of the GPUs; ONLY_SHARDING=1
# keeps just the sharding checks of that phase (bench/sharding_gpu.py, the cases on the GPUs)
# (on the lent H100 the full run is three calls of < 10 min: SKIP_BENCH=1; then SKIP_TESTS=1 with
#  BENCHES="producers consumers decode", then with BENCHES="blockscaled dequant block torch_ops")
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast off
rc=0
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, torch, triton; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if [ "${SKIP_TESTS:-0}" != 1 ] && [ "${ONLY_SHARDING:-0}" != 1 ]; then
  python3 -m pytest -q -n "${TEST_WORKERS:-12}" tests/test_producers.py tests/test_consumers.py tests/test_bridge.py \
      tests/test_contract.py tests/test_torch_ops.py tests/test_layers.py tests/test_mlp.py \
      tests/test_dequant_gemm.py tests/test_mosaic_block_gemm.py tests/test_mosaic_gemm.py \
      ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider 2>&1 | grep -v "^E1124\|Source Location\|cuda_status" \
      > "$OUT/gpu_tests.log"; [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  tail -15 "$OUT/gpu_tests.log"
  python3 bench/bridge_gpu.py --out "$OUT/bridge_gpu.json" 2>&1 | tail -15 || rc=1
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 bench/sharding_gpu.py --out "$OUT/sharding_gpu.json" 2>&1 | tee "$OUT/sharding_gpu.log" || rc=1
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)" -gt 1 ]; then
    QUANTACT_SHARDING_DEVICES=gpu python3 -m pytest -q -s -p no:cacheprovider tests/test_sharding.py -k gpus \
        > "$OUT/sharding_cases_gpu.log" 2>&1 || rc=1
    tail -30 "$OUT/sharding_cases_gpu.log"
  fi
fi
want() { [ -z "${BENCHES:-}" ] || [[ " $BENCHES " == *" $1 "* ]]; }
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  want producers && { python3 -m quantact_jax.bench.producers --out "$OUT/producers.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_producers.log" | tail -30 || rc=1; }
  want consumers && { python3 -m quantact_jax.bench.consumers --out "$OUT/consumers.json" ${CONSUMER_ARGS:-} 2>&1 | grep -v '^{' | tail -12 || rc=1; }
  want decode && { python3 bench/decode_gpu.py --quick --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1 || rc=1; tail -9 "$OUT/decode.log"; }
  want blockscaled && { python3 bench/mosaic_block_gpu.py --quick --out "$OUT/mosaic_block.json" > "$OUT/mosaic_block.log" 2>&1 || rc=1; tail -6 "$OUT/mosaic_block.log"; }
  want dequant && { python3 bench/dequant_gemm_gpu.py --out "$OUT/dequant_gemm.json" > "$OUT/dequant_gemm.log" 2>&1 || rc=1; tail -8 "$OUT/dequant_gemm.log"; }
  want block && { python3 -m quantact_jax.bench.block --out "$OUT/block.json" 2>&1 | tail -20 || rc=1; }
  want torch_ops && { python3 bench/torch_ops_gpu.py --out "$OUT/torch_ops_gpu.json" 2>&1 | tail -20 || rc=1; }
  want tp && { python3 bench/tp_block_gpu.py --out "$OUT/tp_block.json" 2>&1 | tee "$OUT/tp_block.log" || rc=1; }
fi
exit $rc
