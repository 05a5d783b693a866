"""Sweep of the point-detection peak settings (``PointsConfig.peak_*``) on the BM-Graz DEV images.

Every dev image is used once as the (fully annotated) support of the default adaptation and the other images are
the queries; tp/fp/fn are pooled over all (support, query) pairs. The foreground probabilities are computed once,
then every (sigma, min distance, threshold) is scored on them.

Run: ``.venv/bin/python benchmarks/tune_detection.py`` → prints the table (best first) and writes
``benchmarks/results/tune_detection.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from napari_metahistoseg.config import PointsConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.inference import detect_points, predict  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import detection_scores  # noqa: E402
from napari_metahistoseg.pipeline import adapt, load_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(common.DATA / "bm_graz_cells"))
    ap.add_argument("--sigmas", default="3,4,5,6")
    ap.add_argument("--distances", default="6,8,10,12")
    ap.add_argument("--thresholds", default="0.35,0.4,0.45,0.5")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    ds = open_dataset(args.data)
    bb = load_backbone()
    pairs = []  # (support index, probability map, truth points)
    for si, sid in enumerate(ds.ids):
        s = ds.load(sid)
        head = run(adapt(bb, [s.image], [s.semantic], list(ds.class_names), mpp=s.mpp))
        for qid in ds.ids:
            if qid != sid:
                q = ds.load(qid)
                pairs.append((si, run(predict(bb, head, q.image, mpp=q.mpp)).probs[1:].sum(0), q.points))
    default = PointsConfig()
    rows = []
    grid = itertools.product(common.floats(args.sigmas), common.floats(args.distances), common.floats(args.thresholds))
    for sig, md, th in grid:
        cfg = PointsConfig(peak_sigma_px=sig, peak_min_distance_px=int(md), peak_threshold=th)
        per = {}
        for si, prob, truth in pairs:
            d = detection_scores(detect_points(prob, cfg)[0], truth, cfg.match_radius_px)
            acc = per.setdefault(si, [0, 0, 0])
            acc[0] += d["tp"]
            acc[1] += d["fp"]
            acc[2] += d["fn"]
        tp, fp, fn = np.sum(list(per.values()), axis=0)
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        f1s = [2 * a / max(2 * a + b + c, 1) for a, b, c in per.values()]
        rows.append(dict(sigma=sig, distance=int(md), threshold=th, f1=2 * p * r / max(p + r, 1e-12), precision=p,
                         recall=r, f1_per_support=f1s,
                         default=(sig, int(md), th) == (default.peak_sigma_px, default.peak_min_distance_px,
                                                        default.peak_threshold)))
    rows.sort(key=lambda x: -x["f1"])
    shown = rows[:args.top] + [x for x in rows[args.top:] if x["default"]]
    table = common.md_table(
        ["sigma px", "min distance px", "threshold", "F1 (pooled)", "precision", "recall", "F1 per support image",
         "default"],
        [[x["sigma"], x["distance"], x["threshold"], common.fmt(x["f1"]), common.fmt(x["precision"]),
          common.fmt(x["recall"]), ", ".join(common.fmt(v) for v in x["f1_per_support"]), "yes" if x["default"] else ""]
         for x in shown])
    print(table)
    common.write_sweep("tune_detection", {"rows": rows, "supports": ds.ids},
                       f"{len(ds.ids)} support draws × {len(ds.ids) - 1} queries; best {args.top} settings and the "
                       "default", table)


if __name__ == "__main__":
    main()
