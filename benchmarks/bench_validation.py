"""Benchmark: what a training validation (``TrainConfig.val_fraction``) costs and reports, on the real dev tasks.

Splits the tasks of ``--config`` (default ``configs/backbone.json``: MoNuSeg, CPM-15, CoNSeP, GlaS from
``../shared/data``) as a training run with ``val_fraction = --fraction`` and ``seed = --seed`` would, then runs
:func:`napari_metahistoseg.training.validate` once with the weights of ``--backbone`` (a checkpoint, ``default`` or
``transfer``) on ``--device``: per task the generic head adapted (as the GUI's Adapt does) on ``val_support``
training images, mIoU on the held-apart images. Reports the seconds it takes, so that ``val_every`` can be chosen
against the seconds per training step (``bench_train_speed.py``).

The bundled backbones trained on every dev image, so their mIoU here is optimistic (these are not held-out
numbers); a run that trains with the same ``val_fraction`` and seed never sees the held-apart images.

    .venv/bin/python benchmarks/bench_validation.py [--fraction 0.2] [--seed 0] [--backbone default] [--device cpu]

Writes ``benchmarks/results/<--out>.{json,md}`` (default ``validation``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(common.REPO / "configs" / "backbone.json"))
    ap.add_argument("--data-root", default=None, help="folder the config's relative data folders are under "
                                                      "(default: the config's own folder)")
    ap.add_argument("--fraction", type=float, default=0.2, help="TrainConfig.val_fraction")
    ap.add_argument("--seed", type=int, default=0, help="TrainConfig.seed (draws the split and the support)")
    ap.add_argument("--support", type=int, default=1, help="TrainConfig.val_support")
    ap.add_argument("--backbone", default="default", help="weights validated: default, transfer or a checkpoint")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="validation")
    args = ap.parse_args(argv)

    from napari_metahistoseg.maml import run
    from napari_metahistoseg.pipeline import load_backbone
    from napari_metahistoseg.training import (
        load_task_splits,
        load_train_config,
        training_device,
        validate,
        validation_support,
    )

    cfg = load_train_config(args.config, data_root=args.data_root, val_fraction=args.fraction, seed=args.seed,
                            val_support=args.support)
    tasks, val = load_task_splits(cfg.data, cfg.model.mpp, cfg.holdout_tasks, cfg.val_fraction, cfg.seed)
    sup = validation_support(tasks, val, cfg.val_support, cfg.seed)
    bb = load_backbone(args.backbone)
    classes = {k: list(v["classes"]) for k, v in bb.desc.get("heads", {}).items()}
    device = training_device(args.device)
    res = run(validate(bb.model, classes, bb.inner_lrs, val, sup, device, step=0, seed=cfg.seed))
    rows = [[t, len(tasks[t]), r["images"], ", ".join(r["support"]), common.fmt(r["miou"])]
            for t, r in res["tasks"].items()]
    rows.append(["mean", "", sum(r["images"] for r in res["tasks"].values()), "", common.fmt(res["mean_miou"])])
    md = common.md_table(["task", "training samples", "held-apart samples", "support (training samples)", "mIoU"],
                         rows)
    note = (f"Backbone `{args.backbone}` ({bb.sha256[:12]}); val_fraction {cfg.val_fraction}, seed {cfg.seed}, "
            f"val_support {cfg.val_support}; device {device}. One validation took **{res['seconds']:.1f} s**. "
            "The bundled backbones trained on every dev image: their mIoU here is optimistic.")
    common.write_sweep(args.out, {"result": res, "fraction": cfg.val_fraction, "seed": cfg.seed,
                                  "backbone": args.backbone, "device": str(device),
                                  "held_apart": {t: [s.sample_id for s in v] for t, v in val.items()}}, note, md)
    print(md)
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
