"""Smoothing calibration (``MAMLConfig.calibrate_smoothing``): does a class decision on Gaussian-smoothed class
probabilities, with the sigma the support picks, beat the unsmoothed decision on the query images? DEV data only.

For every two-class task and draw, the default head-only adaptation runs on cached features of K support images
(as ``tune_threshold.py``), the threshold is calibrated as the package does, and
:func:`napari_metahistoseg.pipeline.calibrate_smoothing` picks a sigma on the support windows. The query images
are scored (pooled mIoU at image resolution) without smoothing, with the calibrated sigma, and with the best sigma
of the grid *for the query itself* (an oracle).

    .venv/bin/python benchmarks/tune_smoothing.py --tasks glas,bm_graz_cells,monuseg,cpm15 --draws 3

Writes ``benchmarks/results/tune_smoothing.{json,md}``.
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
from napari_metahistoseg.inference import _resize_maps, decide  # noqa: E402
from napari_metahistoseg.maml import head_pixel_logits  # noqa: E402
from napari_metahistoseg.metrics import ConfusionAccumulator  # noqa: E402
from napari_metahistoseg.pipeline import (  # noqa: E402
    calibrate_smoothing,
    calibrate_threshold,
    calibrates,
    calibration_window,
    gaussian_smooth,
    load_backbone,
)


def unit(bb, sup, qry, cfg: MAMLConfig) -> dict:
    labels = [lab for _, lab, _ in sup]
    if not calibrates(cfg, labels, 2):
        return {}
    head, fast, x, y = adapt_binary_cached(bb, sup, cfg)
    t = calibrate_threshold(head, fast, x, y, cfg)
    s = calibrate_smoothing(head, fast, [calibration_window(f, lab, cfg.calibration_window_px) for f, lab, _ in sup],
                            t, cfg, bb.mpp)
    sigmas = sorted(set(cfg.smoothing_um))
    accs = {v: ConfusionAccumulator(2) for v in sigmas}
    with torch.no_grad():
        for f, _, truth in qry:
            p = head_pixel_logits(head, fast, f.reshape(f.shape[0], -1).t()).softmax(1).t().reshape(1, 2, *f.shape[1:])
            for v in sigmas:
                dec = _resize_maps(gaussian_smooth(p, v / bb.mpp)[0].numpy(), truth.shape)
                accs[v].update(decide(dec, t), truth)
    m = {v: accs[v].miou() for v in sigmas}
    best = max(sigmas, key=lambda v: m[v])
    return {"plain": m[0.0] if 0.0 in m else m[sigmas[0]], "calibrated": m[s], "oracle": m[best], "sigma": s,
            "oracle_sigma": best, "threshold": t}


def main() -> None:
    a = dev_args(__doc__, "glas,bm_graz_cells,monuseg,cpm15", 3, "tune_smoothing")
    bb = load_backbone(a.backbone)
    records = []
    for task, d, _, sup, qry in dev_draws(a.tasks, a.draws):
        rec = {"task": task, "draw": d, "k": len(sup), "n_query": len(qry),
               **unit(bb, cached(bb, sup), cached(bb, qry), MAMLConfig(seed=d))}
        records.append(rec)
        print(rec, file=sys.stderr, flush=True)
    rows = []
    for task in a.tasks.split(","):
        rs = [r for r in records if r["task"] == task and "plain" in r]
        if not rs:
            continue
        mean = {m: float(np.mean([r[m] for r in rs])) for m in ("plain", "calibrated", "oracle")}
        rows.append([task, f"{rs[0]['k']} / {rs[0]['n_query']}", len(rs), f"{mean['plain']:.3f}",
                     f"{mean['calibrated']:.3f}", f"{mean['calibrated'] - mean['plain']:+.3f}", f"{mean['oracle']:.3f}",
                     ", ".join(f"{r['sigma']:g}" for r in rs), ", ".join(f"{r['oracle_sigma']:g}" for r in rs)])
    table = common.md_table(["task", "support / query images", "draws", "unsmoothed mIoU", "calibrated mIoU", "gain",
                             "oracle mIoU", "calibrated sigma µm", "oracle sigma µm"], rows)
    note = (f"Backbone `{bb.name}` ({bb.sha256[:12]}); default head-only adaptation on cached features, calibrated "
            "threshold in every column, query mIoU pooled at image resolution; oracle = the best grid sigma for the "
            "query itself.")
    common.write_sweep(a.out, {"records": records}, note, table)
    print(table)


if __name__ == "__main__":
    main()
