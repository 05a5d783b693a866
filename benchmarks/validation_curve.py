"""The validation curve of a training run: held-apart mIoU against the step (``TrainConfig.val_fraction``).

Reads ``RUN/log.jsonl`` (:func:`napari_metahistoseg.training.read_log`) and its ``train_config.json``; prints and
writes a table (step, phase, per-task mIoU of the generic head adapted as the GUI does on ``val_support`` training
images, mean, seconds per validation) and a plot beside the training loss.

    .venv/bin/python benchmarks/validation_curve.py --run runs/val [--out validation_curve]

Writes ``benchmarks/results/<--out>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a training run's output folder (TrainConfig.out_dir)")
    ap.add_argument("--out", default="validation_curve")
    args = ap.parse_args(argv)

    from napari_metahistoseg.training import read_log

    run = Path(args.run)
    steps, vals = read_log(run / "log.jsonl")
    if not vals:
        sys.exit(f"{run / 'log.jsonl'}: no validation records (train with TrainConfig.val_fraction > 0)")
    cfg = json.loads((run / "train_config.json").read_text())
    phase = {r["step"]: r["phase"] for r in steps}
    tasks = sorted({t for v in vals for t in v["tasks"]})
    rows = [[v["step"], phase.get(v["step"], "start"), *[common.fmt(v["tasks"].get(t, {}).get("miou")) for t in tasks],
             common.fmt(v["mean_miou"]), common.fmt(v["seconds"], 1)] for v in vals]
    md = common.md_table(["step", "phase", *[f"{t} mIoU" for t in tasks], "mean mIoU", "validation s"], rows)
    held = {t: r["images"] for t, r in vals[-1]["tasks"].items()}
    note = (f"Run `{run}`: {cfg['supervised_steps']} supervised + {cfg['meta_steps']} meta steps planned, "
            f"{steps[-1]['step'] if steps else 0} done; val_fraction {cfg['val_fraction']}, seed {cfg['seed']}, "
            f"val_support {cfg['val_support']}; held-apart samples per task {held} (never trained on).")
    fig, (ax, vx) = common.new_figure(2, width=5.0)
    ax.plot([r["step"] for r in steps], [r["total"] for r in steps], lw=0.5, color="0.6")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (total)")
    for t in tasks:
        pts = [(v["step"], v["tasks"][t]["miou"]) for v in vals if t in v["tasks"]]
        vx.plot(*zip(*pts, strict=True), marker=".", label=t)
    vx.plot([v["step"] for v in vals], [v["mean_miou"] for v in vals], "k--", label="mean")
    vx.set_xlabel("step")
    vx.set_ylabel("mIoU on held-apart images")
    vx.legend(fontsize=7)
    common.save_plot(fig, args.out)
    common.write_sweep(args.out, {"run": str(run), "validations": vals, "config": cfg}, note, md)
    print(md)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
