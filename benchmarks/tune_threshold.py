"""Threshold calibration (``MAMLConfig.calibrate_threshold``): does a class decision at the support-optimal
foreground threshold beat the plain arg-max on the query images? DEV data only.

For every two-class task and draw, the default head-only adaptation runs on cached features of K support images
(as ``tune_adapt.py``); the query images are then scored (pooled mIoU at model resolution) with the arg-max, with
the threshold :func:`napari_metahistoseg.pipeline.calibrate_threshold` picks on the support, and with the best
threshold of the grid *for the query itself* (an oracle: the most any threshold rule could gain).

    .venv/bin/python benchmarks/tune_threshold.py --tasks monuseg,glas,cpm15,bm_graz_cells --draws 3

Writes ``benchmarks/results/tune_threshold.{json,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tune_adapt import adapt_binary_cached, cached, dev_args, dev_draws  # noqa: E402

from napari_metahistoseg.config import MAMLConfig  # noqa: E402
from napari_metahistoseg.maml import head_pixel_logits  # noqa: E402
from napari_metahistoseg.pipeline import (  # noqa: E402
    calibrate_threshold,
    calibrates,
    load_backbone,
    threshold_grid,
)


def miou_at(prob: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Two-class mIoU of ``prob >= t`` against ``truth`` (IGNORE skipped) for every ``t``: (inter, union) pairs
    ``(T, 2, 2)`` so that images can be pooled."""
    v = truth != 255
    t = truth[v].astype(bool)
    p = prob[v][None, :] >= thresholds[:, None]
    return np.stack([np.stack([(~p & ~t).sum(1), (~p | ~t).sum(1)], 1),
                     np.stack([(p & t).sum(1), (p | t).sum(1)], 1)], 1).astype(np.float64)


def pooled(counts: np.ndarray) -> np.ndarray:
    return (counts[:, :, 0] / np.maximum(counts[:, :, 1], 1)).mean(1)


def unit(bb, sup, qry, cfg: MAMLConfig) -> dict:
    labels = [lab for _, lab, _ in sup]
    head, fast, x, y = adapt_binary_cached(bb, sup, cfg)
    t = calibrate_threshold(head, fast, x, y, cfg) if calibrates(cfg, labels, 2) else None
    ths = threshold_grid(cfg)
    counts = 0
    with torch.no_grad():
        for f, lab, _ in qry:
            p = head_pixel_logits(head, fast, f.reshape(f.shape[0], -1).t()).softmax(1)[:, 1].reshape(f.shape[1:])
            counts = counts + miou_at(p.numpy(), lab, np.r_[0.5, ths, t if t is not None else 0.5])
    m = pooled(counts)
    return {"argmax": float(m[0]), "calibrated": float(m[-1]), "oracle": float(m[1:-1].max()),
            "threshold": t, "oracle_threshold": float(ths[int(np.argmax(m[1:-1]))])}


def main() -> None:
    a = dev_args(__doc__, "monuseg,glas,cpm15,bm_graz_cells", 3, "tune_threshold")
    bb = load_backbone(a.backbone)
    records = []
    for task, d, _, sup, qry in dev_draws(a.tasks, a.draws):
        rec = {"task": task, "draw": d, "k": len(sup), "n_query": len(qry),
               **unit(bb, cached(bb, sup), cached(bb, qry), MAMLConfig(seed=d))}
        records.append(rec)
        print(rec, file=sys.stderr, flush=True)
    rows = []
    for task in a.tasks.split(","):
        rs = [r for r in records if r["task"] == task]
        mean = {m: float(np.mean([r[m] for r in rs])) for m in ("argmax", "calibrated", "oracle")}
        gain = mean["calibrated"] - mean["argmax"]
        rows.append([task, f"{rs[0]['k']} / {rs[0]['n_query']}", len(rs), f"{mean['argmax']:.3f}",
                     f"{mean['calibrated']:.3f}", f"{gain:+.3f}", f"{mean['oracle']:.3f}",
                     ", ".join("–" if r["threshold"] is None else f"{r['threshold']:.2f}" for r in rs),
                     ", ".join(f"{r['oracle_threshold']:.2f}" for r in rs)])
    table = common.md_table(["task", "support / query images", "draws", "arg-max mIoU", "calibrated mIoU", "gain",
                             "oracle mIoU", "calibrated thresholds", "oracle thresholds"], rows)
    note = (f"Backbone `{bb.name}` ({bb.sha256[:12]}); default head-only adaptation on cached features, pooled query "
            "mIoU at model resolution (0.5 µm/px); oracle = the best grid threshold for the query itself.")
    common.write_sweep(a.out, {"records": records}, note, table)
    print(table)


if __name__ == "__main__":
    main()
