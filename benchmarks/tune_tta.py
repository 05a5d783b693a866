"""Test-time augmentation (``TilingConfig.tta_variants``): do averaged flipped/transposed predictions score better
than the plain one on the query images, and at what cost? DEV data only.

For every task and draw, the default adaptation (the GUI's Adapt button) runs once on K support images; each query
image is then predicted (``inference.predict``, as ``metahistoseg evaluate`` does) with 1, 2, 4 and 8 variants and
scored: pooled mIoU, and AJI/PQ of the HoVer nuclei (nuclear tasks) or detection F1 of the centroids (points).

    .venv/bin/python benchmarks/tune_tta.py --tasks monuseg,cpm15,glas,bm_graz_cells --draws 2

Writes ``benchmarks/results/tune_tta.{json,md}``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tune_adapt import dev_args, dev_draws  # noqa: E402

from napari_metahistoseg.config import MAMLConfig, PointsConfig, TilingConfig  # noqa: E402
from napari_metahistoseg.evaluation import _is_nuclear  # noqa: E402
from napari_metahistoseg.inference import detect_points, predict  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import ConfusionAccumulator, aji, detection_scores, panoptic_quality  # noqa: E402
from napari_metahistoseg.pipeline import adapt, load_backbone  # noqa: E402


def unit(bb, ds, sup, qry, variants: list[int], seed: int) -> list[dict]:
    head = run(adapt(bb, [s.image for s in sup], [s.semantic for s in sup], list(ds.class_names),
                     mpp=[s.mpp for s in sup], cfg=MAMLConfig(seed=seed)))
    nuclear = ds.kind != "points" and _is_nuclear(sup)
    pcfg = PointsConfig()
    out = []
    for v in variants:
        acc, inst, det, secs = ConfusionAccumulator(len(ds.class_names)), [], [], 0.0
        for q in qry:
            t0 = time.perf_counter()
            pred = run(predict(bb, head, q.image, mpp=q.mpp, instances=nuclear, tiling=TilingConfig(tta_variants=v)))
            secs += time.perf_counter() - t0
            acc.update(pred.semantic, q.semantic)
            if nuclear and q.instances is not None:
                inst.append((aji(q.instances, pred.instances), panoptic_quality(q.instances, pred.instances)["pq"]))
            if ds.kind == "points" and q.points is not None:
                pts, _ = detect_points(pred.probs[1:].sum(0), pcfg)
                det.append(detection_scores(pts, q.points, pcfg.match_radius_px))
        rec = {"variants": v, "miou": acc.miou(), "predict_s_per_image": secs / len(qry)}
        if inst:
            rec["aji"], rec["pq"] = (float(x) for x in np.mean(inst, 0))
        if det:
            tp, fp, fn = (sum(d[k] for d in det) for k in ("tp", "fp", "fn"))
            rec["det_f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        out.append(rec)
    return out


def main() -> None:
    a = dev_args(__doc__, "monuseg,cpm15,glas,bm_graz_cells", 2, "tune_tta",
                 extra=lambda ap: ap.add_argument("--variants", default="1,2,4,8"))
    bb = load_backbone(a.backbone)
    variants = [int(v) for v in a.variants.split(",")]
    records = []
    for task, d, ds, sup, qry in dev_draws(a.tasks, a.draws):
        for rec in unit(bb, ds, sup, qry, variants, seed=d):
            rec.update(task=task, draw=d, k=len(sup), n_query=len(qry))
            records.append(rec)
            print(rec, file=sys.stderr, flush=True)
    rows = []
    for task in a.tasks.split(","):
        base = {r["draw"]: r for r in records if r["task"] == task and r["variants"] == 1}
        for v in variants:
            rs = [r for r in records if r["task"] == task and r["variants"] == v]

            def cell(m: str, rs=rs, base=base) -> str:
                if m not in rs[0]:
                    return "–"
                gain = np.mean([r[m] - base[r["draw"]][m] for r in rs]) if base else 0.0
                return f"{np.mean([r[m] for r in rs]):.3f} ({gain:+.3f})"
            rows.append([task, f"{rs[0]['k']} / {rs[0]['n_query']}", v, len(rs), cell("miou"), cell("aji"),
                         cell("pq"), cell("det_f1"), f"{np.mean([r['predict_s_per_image'] for r in rs]):.2f}"])
    table = common.md_table(["task", "support / query images", "variants", "draws", "mIoU (vs 1)", "AJI (vs 1)",
                             "PQ (vs 1)", "det F1 (vs 1)", "predict s / image"], rows)
    note = (f"Backbone `{bb.name}` ({bb.sha256[:12]}); default adaptation (`MAMLConfig()`), queries predicted by "
            "`inference.predict` at each `TilingConfig.tta_variants`; gains are per draw against 1 variant.")
    common.write_sweep(a.out, {"records": records}, note, table)
    print(table)


if __name__ == "__main__":
    main()
