#!/usr/bin/env bash
# The checks that need a GPU, in one run (a lent GPU is scarce: one short script, every step time-boxed).
#
#   bash scripts/gpu_check.sh [OUT_DIR]          (STEPS="tests throughput profile levers adapt train" by default)
#
# 1. pytest: tests/test_gpu.py (CUDA against the CPU: prediction fp32/bf16 with tiles blended on the GPU, streamed
#    slides, head/decoder adaptation on device sets mixing GPUs and the CPU, mitosis, training resumed on the GPU)
#    and tests/test_training.py (device "auto" trains on the GPU there).
# 2. benchmarks/bench_throughput.py --no-cpu: semantic prediction MP/s on cuda:0 (fp32, bf16, bf16 with host
#    blending for comparison, fp32/bf16 with channels-last on the GPU too; a head with colour inputs)
#    -> benchmarks/results/throughput_gpu.*
# 3. benchmarks/profile_gpu_predict.py: a GPU prediction against its parts -> gpu_profile.txt
#    benchmarks/probe_gpu_levers.py --quick: layout, bf16, GroupNorm path, tiles and torch.compile end to end
#    -> probe_gpu_levers.{json,md} and a profile
#    benchmarks/bench_adapt_speed.py --devices cuda:0 -> adapt_speed_gpu.* (needs MoNuSeg: METAHISTOSEG_DATA)
# 4. benchmarks/bench_train_speed.py --device cuda:0 --workers 0,4,8,12 -> train_speed_gpu.*
#
# Python packages missing on the GPU machine travel as wheels in .whl/ (zarr and its needs: make them here with
# scripts/gpu_wheels.sh and carry .whl; without zarr the streamed-slide GPU test fails, as in session 13).
# Everything lands in OUT_DIR (default $OUT, else /tmp/gpu_check) and in OUT_DIR/results.tar.gz.
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT_DIR/gpu_check.log
STEPS=${STEPS:-tests throughput profile levers adapt train}
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }

step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
  nproc; git rev-parse --short HEAD 2>/dev/null; } 2>&1 | tee -a "$LOG"

want tests && step "pytest (gpu + training)" && timeout 180 $PY -m pytest -q -p no:cacheprovider -o addopts="--import-mode=importlib" \
    tests/test_gpu.py tests/test_training.py -m "gpu or not slow" 2>&1 | tail -25 | tee -a "$LOG"

want throughput && step throughput && timeout 180 $PY benchmarks/bench_throughput.py --no-cpu --colour --repeats 3 --name throughput_gpu 2>&1 \
    | tail -22 | tee -a "$LOG"

want profile && step profile && timeout 120 $PY benchmarks/profile_gpu_predict.py --out gpu_profile 2>&1 \
    | grep -v "^ " | head -16 | tee -a "$LOG"

want levers && step levers && timeout 150 $PY benchmarks/probe_gpu_levers.py --quick --budget-s 110 --out "$OUT_DIR" 2>&1 \
    | grep -E "^(channels|NCHW|    profile|done)" | tee -a "$LOG"

DATA_DIR=${METAHISTOSEG_DATA:-../shared/data}
if want adapt && [ ! -d "$DATA_DIR/monuseg" ]; then
    step "adapt speed skipped: no MoNuSeg dev data at $DATA_DIR (set METAHISTOSEG_DATA)"
    STEPS=${STEPS/adapt/}
fi
want adapt && step "adapt speed" && timeout 150 $PY benchmarks/bench_adapt_speed.py --devices cuda:0 --repeats 3 --decoder-repeats 1 \
    --out adapt_speed_gpu 2>&1 | tail -30 | tee -a "$LOG"

want train && step "train speed" && timeout 150 $PY benchmarks/bench_train_speed.py --device cuda:0 --supervised 30 \
    --meta 10 --workers 0,4,8,12 --out train_speed_gpu \
    2>&1 | tail -8 | tee -a "$LOG"

step done
tar czf "$OUT_DIR/results.tar.gz" benchmarks/results/*gpu* 2>/dev/null
cp benchmarks/results/*gpu* "$OUT_DIR"/ 2>/dev/null
ls -la "$OUT_DIR" | tee -a "$LOG"
