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
# RUNS="loto_monuseg_gpu@300+100 loto_monuseg_gpu@800+200": other runs/lengths; WORKERS=N loader processes per run;
# BENCH=0: no benchmarks. DRY=1: a few CPU steps of each, to test this script without a GPU.
# VAL=0.2 [VAL_EVERY=200]: hold that share of each task's images apart and validate on them every VAL_EVERY steps
# (TrainConfig.val_fraction / val_every): log.jsonl then carries the held-apart mIoU against the step
# (benchmarks/validation_curve.py), i.e. the length question below answered by one run instead of several.
#
# Selecting the recipe's length on unseen images of the training sources (the next GPU session's plan; BENCHMARKS.md
# "GPU training of the backbone"): pack with --holdout (scripts/pack_training_data.py), e.g.
#   --holdout 'monuseg:TCGA-21-*' --holdout 'monuseg:TCGA-NH-*' --holdout 'glas:testB_*' --holdout 'consep:train_2*'
#   --holdout-out runs/holdout
# then RUNS="backbone_gpu@300+100 backbone_gpu@800+200 backbone_gpu@1700+450 backbone_gpu@4000+800" BENCH=0, and
# evaluate each checkpoint here with `benchmarks/holdout_check.py --holdout runs/holdout --backbones LABEL=PATH,...
# --draws TASK:ID[,ID...] ...` (the evaluate command's own path; session 11 used it for a CPU-trained twin).
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_train}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
TRAIN_S=${TRAIN_S:-350}
DATA=${DATA:-.gpu/data}
RUNS=${RUNS:-backbone_gpu loto_monuseg_gpu}  # CONFIG or CONFIG@SUP+META (configs/CONFIG.json at another length)
LOG=$OUT_DIR/gpu_train.log
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }
step machine
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null; nproc
  $PY -c "import torch; print(torch.__version__, torch.cuda.is_available())"; git rev-parse --short HEAD 2>/dev/null; } \
  2>&1 | tee -a "$LOG"

step train
mkdir -p .gpu/cfg .gpu/runs
for spec in $RUNS; do
    name=${spec//[@+]/_}
    $PY - "$spec" "$DATA" <<'PYEOF'
import json, os, sys
from pathlib import Path
spec, data = sys.argv[1], sys.argv[2]
base, _, steps = spec.partition("@")
name = spec.replace("@", "_").replace("+", "_")
cfg = json.loads(Path(f"configs/{base}.json").read_text())
if steps:  # CONFIG@SUP+META: the same recipe at another length (the cosine schedule spans the new total)
    cfg["supervised_steps"], cfg["meta_steps"] = (int(x) for x in steps.split("+"))
if os.environ.get("WORKERS"):
    cfg["loader_workers"] = int(os.environ["WORKERS"])
cfg["data"] = {k: str(Path(data).resolve() / Path(v).name) for k, v in cfg["data"].items()}
cfg["out_dir"] = f".gpu/runs/{name}"
if os.environ.get("VAL"):
    cfg["val_fraction"] = float(os.environ["VAL"])
    cfg["val_every"] = int(os.environ.get("VAL_EVERY", "200"))
if os.environ.get("DRY"):
    cfg.update(supervised_steps=4, meta_steps=2, checkpoint_every=2, loader_workers=1, device="cpu")
Path(f".gpu/cfg/{name}.json").write_text(json.dumps(cfg, indent=1))
PYEOF
    timeout "$TRAIN_S" $PY -m napari_metahistoseg meta-train --config ".gpu/cfg/$name.json" > "$OUT_DIR/$name.out" 2>&1 &
done
wait
for spec in $RUNS; do
    name=${spec//[@+]/_}
    tail -3 "$OUT_DIR/$name.out" | tee -a "$LOG"
    cp .gpu/cfg/$name.json .gpu/runs/$name/run_config.json 2>/dev/null
done
for spec in $RUNS; do
    name=${spec//[@+]/_}
    cp .gpu/runs/$name/last.safetensors "$OUT_DIR/${name}_last.safetensors" 2>/dev/null
    [[ $name == backbone* ]] && cp .gpu/runs/$name/transfer.safetensors "$OUT_DIR/${name}_transfer.safetensors" 2>/dev/null
done
tar czf "$OUT_DIR/runs.tar.gz" --exclude='*.safetensors' .gpu/runs "$OUT_DIR"/*.out 2>/dev/null

if [ -z "${DRY:-}" ] && [ "${BENCH:-1}" = 1 ]; then
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
