"""Export a training run's checkpoints into the package (float16 storage, provenance) and plot its curves.

    .venv/bin/python scripts/export_backbone.py --run runs/backbone

Writes napari_metahistoseg/weights/{backbone,transfer}.{safetensors,json} and docs/training_curves.png.
The weights are rounded to float16 *before* hashing, so the recorded backbone SHA-256 is that of what loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_metahistoseg.checkpoints import load_model, save_model  # noqa: E402
from napari_metahistoseg.training import read_log  # noqa: E402

WEIGHTS = ROOT / "napari_metahistoseg" / "weights"
DATA_LICENCES = {
    "monuseg": "MoNuSeg 2018 training images (5 of 30), CC BY-NC-SA 4.0",
    "cpm15": "CPM-15 training set (10 of 15 tiles), research use only",
    "consep": "CoNSeP training tiles (27 images), non-commercial research use (TIA Centre, Warwick)",
    "glas": "GlaS (32 images of 8 patients), research non-commercial use (TIA Centre, Warwick)",
}


def export(run: Path, name: str, out: str, meta_phase: bool) -> dict:
    model, desc, lrs = load_model(run / name)
    model = model.half().float()  # what float16 storage will give back
    classes = {k: v["classes"] for k, v in desc["heads"].items()}
    classes["hover"] = ["background", "other", "inflammatory", "epithelial", "spindle"]
    train = desc.get("training", {})
    extra = {
        "name": out,
        "training": train,
        "training_data": DATA_LICENCES,
        "licence_note": "weights derived from non-commercial research data: research use only",
        "method": "supervised multi-task + MAML (generic head, learned per-tensor inner lrs)" if meta_phase
        else "supervised multi-task only (transfer-learning baseline)",
        "excluded_tasks": ["bm_graz_cells (kept out so it stays a genuinely new task)", "amibr_mitosis"],
    }
    save_model(model, WEIGHTS / out, head_classes=classes, inner_lrs=lrs if meta_phase else None, extra=extra,
               half=True)
    return json.loads((WEIGHTS / f"{out}.json").read_text())


def plot_curves(run: Path, dest: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, vals = read_log(run / "log.jsonl")
    keys = sorted({k for r in rows for k in r if "/" in k})
    fig, axes = plt.subplots(1, 2 if vals else 1, figsize=(14 if vals else 9, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if vals else None)
    ax = axes[0][0]
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        s, v = np.array(pts).T
        win = 25
        sm = np.convolve(v, np.ones(win) / win, mode="valid") if len(v) > win else v
        ax.plot(s[len(s) - len(sm):], sm, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average of 25 steps)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("backbone training: supervised multi-task, then MAML episodes")
    if vals:  # TrainConfig.val_fraction: the adapted generic head's mIoU on held-apart images, per task
        vx = axes[0][1]
        for task in sorted({t for v in vals for t in v["tasks"]}):
            pts = [(v["step"], v["tasks"][task]["miou"]) for v in vals if task in v["tasks"]]
            vx.plot(*zip(*pts, strict=True), marker=".", label=task)
        vx.plot([v["step"] for v in vals], [v["mean_miou"] for v in vals], "k--", label="mean")
        vx.set_xlabel("step")
        vx.set_ylabel("mIoU on held-apart images")
        vx.set_title("validation (head adapted as in the GUI)")
        vx.legend(fontsize=7)
    fig.tight_layout()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    return {"steps": rows[-1]["step"], "seconds": training_seconds(run)}


def training_seconds(run: Path) -> float:
    """Wall time over all resumed segments of the log (``seconds`` restarts at every resume; the validation
    records' ``seconds`` are their own duration and are not counted)."""
    total, last = 0.0, 0.0
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("phase") == "validation":
            continue
        sec = r["seconds"]
        if sec < last:
            total += last
        last = sec
    return round(total + last, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/backbone")
    a = ap.parse_args()
    run = ROOT / a.run
    d1 = export(run, "last", "backbone", True)
    d2 = export(run, "transfer", "transfer", False)
    info = plot_curves(run, ROOT / "docs" / "training_curves.png")
    print(json.dumps(info))
    for d in (d1, d2):
        print(d["name"], d["backbone_sha256"][:16], d["training"].get("steps_done"))


if __name__ == "__main__":
    main()
