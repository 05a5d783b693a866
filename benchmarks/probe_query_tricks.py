"""Probe: two query-side levers for the quality goals, through the same adapt/predict path as ``evaluate``.

* ``scale``: the model is told each image's µm/px times a factor (support and queries alike), so it sees the
  tissue finer (factor > 1: nuclei look larger) or coarser (< 1) than at its own 0.5 µm/px; predictions are still
  scored at the image's own pixels.
* ``pseudo``: transductive self-training. After the default adaptation on the support, each query is predicted,
  its pixels whose top class probability is ≥ ``--confidence`` become labels (the rest stays *unknown*), and the
  head is adapted again from the start on the support plus that pseudo-labelled query, then the query is
  predicted again.

Each draw adapts on ``K`` images (K = 1, GlaS 4) and predicts the other images of the set (at most ``--queries``);
scores are pooled mIoU and, for nuclei, mean AJI / PQ of the HoVer instances.

    .venv/bin/python benchmarks/probe_query_tricks.py [--sets monuseg,glas] [--factors 0.85,1.2]
        [--confidence 0.9] [--draws 5] [--queries 6]

Writes ``benchmarks/results/probe_query_tricks.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SUPPORT = {"glas": 4}  # support images per draw (else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="monuseg,glas")
    ap.add_argument("--factors", default="0.85,1.2", help="µm/px factors told to the model besides 1")
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--draws", type=int, default=5, help="draws per set (at most its images / K)")
    ap.add_argument("--queries", type=int, default=6, help="query images per draw (at most)")
    ap.add_argument("--out", default="probe_query_tricks")
    args = ap.parse_args(argv)

    from napari_metahistoseg.data import open_dataset
    from napari_metahistoseg.data.task import IGNORE
    from napari_metahistoseg.evaluation import _is_nuclear
    from napari_metahistoseg.inference import predict
    from napari_metahistoseg.maml import run
    from napari_metahistoseg.metrics import ConfusionAccumulator, aji, panoptic_quality
    from napari_metahistoseg.pipeline import adapt, load_backbone

    bb = load_backbone("default")
    variants = ["default"] + [f"scale x{f:g}" for f in common.floats(args.factors)] + \
        [f"pseudo-labels p >= {args.confidence:g}"]
    rows = []
    for name in args.sets.split(","):
        ds = open_dataset(name if Path(name).is_dir() else common.DATA / name)
        k = SUPPORT.get(name, 1)
        draws = min(args.draws, len(ds.ids) // k)
        conf = {v: ConfusionAccumulator(len(ds.class_names)) for v in variants}
        inst = {v: [] for v in variants}
        t0 = time.time()
        for d in range(draws):
            sids = ds.ids[d * k:(d + 1) * k]
            qids = [i for i in ds.ids if i not in sids][:args.queries]
            sup = [ds.load(i) for i in sids]
            nuclear = _is_nuclear(sup)
            qs = [ds.load(i) for i in qids]
            for v in variants:
                f = float(v.split("x")[1]) if v.startswith("scale") else 1.0
                told = lambda s, f=f: dataclasses.replace(s, mpp=(s.mpp or bb.mpp) * f)  # noqa: E731
                sup_v = [told(s) for s in sup]
                head = run(adapt(bb, [s.image for s in sup_v], [s.semantic for s in sup_v], list(ds.class_names),
                                 mpp=[s.mpp for s in sup_v]))
                for q in qs:
                    qv = told(q)
                    pred = run(predict(bb, head, qv.image, mpp=qv.mpp, instances=nuclear))
                    if v.startswith("pseudo"):
                        pl = np.where(pred.probs.max(0) >= args.confidence, pred.probs.argmax(0), IGNORE)
                        h2 = run(adapt(bb, [s.image for s in sup] + [q.image],
                                       [s.semantic for s in sup] + [pl.astype(np.uint8)], list(ds.class_names),
                                       mpp=[s.mpp for s in sup] + [q.mpp]))
                        pred = run(predict(bb, h2, q.image, mpp=q.mpp, instances=nuclear))
                    conf[v].update(pred.semantic, q.semantic)
                    if nuclear and q.instances is not None:
                        inst[v].append((aji(q.instances, pred.instances),
                                        panoptic_quality(q.instances, pred.instances)["pq"]))
            print(f"{name} draw {d}: " + ", ".join(f"{v} {conf[v].miou():.4f}" for v in variants), flush=True)
        for v in variants:
            a = np.array(inst[v]) if inst[v] else None
            rows.append({"set": name, "variant": v, "k": k, "draws": draws, "miou": conf[v].miou(),
                         "aji": None if a is None else float(a[:, 0].mean()),
                         "pq": None if a is None else float(a[:, 1].mean()), "seconds": round(time.time() - t0)})
            print(rows[-1], flush=True)
    table = common.md_table(["set", "support images", "draws", "variant", "mIoU (pooled)", "AJI", "PQ"],
                            [[r["set"], r["k"], r["draws"], r["variant"], r["miou"],
                              "–" if r["aji"] is None else r["aji"], "–" if r["pq"] is None else r["pq"]]
                             for r in rows])
    common.write_sweep(args.out, {"rows": rows, "args": vars(args)},
                       f"Bundled backbone, default adaptation (`MAMLConfig()`) and prediction; draws of consecutive "
                       f"image ids as the support, up to {args.queries} other images as queries.", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
