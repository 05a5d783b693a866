#!/usr/bin/env bash
# Train the backbone (and a leave-MoNuSeg-out twin, for an honest check) on a lent GPU, and probe GPU speed, in one run.
#
#   .venv/bin/python scripts/pack_training_data.py --config configs/backbone.json --out .gpu/data   # here, ~48 MB
#   (device) bash scripts/gpu_train.sh [OUT_DIR]        with .gpu carried (git-ignored: never commit the pack)
#
# 1. configs/backbone_gpu.json and configs/loto_monuseg_gpu.json side by side (each with its loader processes),
#    reading the packed tasks (data folders rewritten to .gpu/data/<name>); time-boxed by TRAIN_S: a run stopped
#    early still leaves its last checkpoint (every 200 steps).
# 2. benchmarks/bench_throughput.py --no-cpu (channels-last against NCHW rows) and benchmarks/probe_compile.py
#    (torch.compile of the forward), time-boxed.
# 3. Into OUT_DIR: the fp32 checkpoints (last, transfer) and tar.gz files of the runs' logs/configs and of the
#    benchmark results (the checkpoints are copied before the benchmarks start).
# DRY=1: a few CPU steps of each, to test this script without a GPU.
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_train}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
TRAIN_S=${TRAIN_S:-350}
DATA=${DATA:-.gpu/data}
LOG=$OUT_DIR/gpu_train.log
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }
step machine
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; nproc
  $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; git rev-parse --short HEAD 2>/dev/null; } \
  2>&1 | tee -a "$LOG"

step train
mkdir -p .gpu/cfg .gpu/runs
for name in backbone_gpu loto_monuseg_gpu; do
    $PY - "$name" "$DATA" <<'PYEOF'
import json, sys
from pathlib import Path
name, data = sys.argv[1], sys.argv[2]
cfg = json.loads(Path(f"configs/{name}.json").read_text())
cfg["data"] = {k: str(Path(data).resolve() / Path(v).name) for k, v in cfg["data"].items()}
cfg["out_dir"] = f".gpu/runs/{name}"
import os
if os.environ.get("DRY"):
    cfg.update(supervised_steps=4, meta_steps=2, checkpoint_every=2, loader_workers=1, device="cpu")
Path(f".gpu/cfg/{name}.json").write_text(json.dumps(cfg, indent=1))
PYEOF
    timeout "$TRAIN_S" $PY -m napari_metahistoseg meta-train --config ".gpu/cfg/$name.json" > "$OUT_DIR/$name.out" 2>&1 &
done
wait
for name in backbone_gpu loto_monuseg_gpu; do
    tail -3 "$OUT_DIR/$name.out" | tee -a "$LOG"
    cp .gpu/cfg/$name.json .gpu/runs/$name/run_config.json 2>/dev/null
done
cp .gpu/runs/backbone_gpu/last.safetensors "$OUT_DIR/full_last.safetensors" 2>/dev/null
cp .gpu/runs/backbone_gpu/transfer.safetensors "$OUT_DIR/full_transfer.safetensors" 2>/dev/null
cp .gpu/runs/loto_monuseg_gpu/last.safetensors "$OUT_DIR/loto_last.safetensors" 2>/dev/null
tar czf "$OUT_DIR/runs.tar.gz" --exclude='*.safetensors' .gpu/runs "$OUT_DIR"/*.out 2>/dev/null

if [ -z "${DRY:-}" ]; then
    step throughput
    timeout 100 $PY benchmarks/bench_throughput.py --no-cpu --gpu-tiles 1024 --gpu-batches 8,16 --repeats 3 \
        --name throughput_gpu 2>&1 | tail -14 | tee -a "$LOG"
    step "compile probe"
    timeout 100 $PY benchmarks/probe_compile.py --modes eager,default 2>&1 | tail -10 | tee -a "$LOG"
fi

step collect
tar czf "$OUT_DIR/bench.tar.gz" benchmarks/results/*gpu* 2>/dev/null
rm -f "$OUT_DIR"/*.out
ls -la "$OUT_DIR" | tee -a "$LOG"
