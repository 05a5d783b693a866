"""Sweep of the large-object (gland) instance settings (``ObjectPostConfig``) on the GlaS DEV images.

Two support draws of 4 images each (the default adaptation); every other image is a query. The adapted
foreground is computed once per query, then every setting is scored (AJI, PQ, predicted/true object ratio),
against plain connected components of the foreground (what evaluate used before).

Run: ``.venv/bin/python benchmarks/tune_objects.py`` → prints the table (best PQ first) and writes
``benchmarks/results/tune_objects.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from napari_metahistoseg.config import ObjectPostConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.inference import predict  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import aji, panoptic_quality  # noqa: E402
from napari_metahistoseg.pipeline import adapt, load_backbone  # noqa: E402
from napari_metahistoseg.postprocess import object_instances  # noqa: E402

DRAWS = ((0, 9, 17, 26), (3, 12, 20, 29))  # support image indices per draw



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(common.DATA / "glas"))
    ap.add_argument("--depths", default="0,4,8,10,12,16", help="split_depth_um values (0 = components only)")
    ap.add_argument("--smooth", default="2,4,8")
    ap.add_argument("--min-area", default="0,200,1000")
    ap.add_argument("--fill", default="true,false")
    ap.add_argument("--work-mpp", default="0", help="work_mpp_um values (0 = the image's own resolution)")
    ap.add_argument("--marker-mpp", default="0", help="marker_mpp_um values (0 = at the working resolution)")
    ap.add_argument("--truth", action="store_true",
                    help="score the rules on the truth foreground (what they cost on a perfect mask)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="tune_objects", help="results name under benchmarks/results/")
    args = ap.parse_args()
    ds = open_dataset(args.data)
    bb = load_backbone()
    queries = []  # (foreground mask, truth instances, mpp)
    for idx in DRAWS:
        sup = [ds.load(ds.ids[i]) for i in idx]
        head = run(adapt(bb, [s.image for s in sup], [s.semantic for s in sup], list(ds.class_names),
                         mpp=[s.mpp for s in sup]))
        for i, qid in enumerate(ds.ids):
            if i not in idx:
                q = ds.load(qid)
                fg = q.instances > 0 if args.truth else run(predict(bb, head, q.image, mpp=q.mpp)).semantic > 0
                queries.append((fg, q.instances, q.mpp or bb.mpp))
    grid = [ObjectPostConfig(fill_holes=f == "true", min_object_area_um2=a, split_depth_um=d, smooth_um=s,
                             work_mpp_um=w, marker_mpp_um=m)
            for f, a, d, s, w, m in itertools.product(args.fill.split(","), common.floats(args.min_area),
                                                      common.floats(args.depths), common.floats(args.smooth),
                                                      common.floats(args.work_mpp), common.floats(args.marker_mpp))]
    grid = list(dict.fromkeys(dataclasses.replace(c, smooth_um=0.0) if c.split_depth_um == 0 else c for c in grid))
    baseline = ObjectPostConfig(fill_holes=False, min_object_area_um2=0.0, split_depth_um=0.0, smooth_um=0.0)
    if baseline not in grid:
        grid.append(baseline)
    rows = []
    for cfg in grid:
        r = []
        t0 = time.perf_counter()
        for mask, truth, mpp in queries:
            inst = object_instances(mask, cfg, mpp)
            r.append((aji(truth, inst), panoptic_quality(truth, inst)["pq"],
                      (len(np.unique(inst)) - 1) / max(len(np.unique(truth)) - 1, 1)))
        seconds = time.perf_counter() - t0
        a, p, n = np.mean(r, 0)
        rows.append(dict(**dataclasses.asdict(cfg), aji=float(a), pq=float(p), ratio=float(n),
                         ms_per_mp=1e3 * seconds / sum(q[0].size / 1e6 for q in queries),
                         default=cfg == ObjectPostConfig(), components=cfg == baseline))
    rows.sort(key=lambda x: -x["pq"])
    shown = rows[:args.top] + [x for x in rows[args.top:] if x["default"] or x["components"]]
    table = common.md_table(
        ["fill holes", "min area µm²", "split depth µm", "smooth µm", "work µm/px", "marker µm/px", "AJI", "PQ",
         "n ratio",
         "ms / MP", "note"],
        [[x["fill_holes"], x["min_object_area_um2"], x["split_depth_um"], x["smooth_um"], x["work_mpp_um"],
          x["marker_mpp_um"], common.fmt(x["aji"]), common.fmt(x["pq"]), common.fmt(x["ratio"], 2),
          f"{x['ms_per_mp']:.0f}",
          "default" if x["default"] else ("connected components" if x["components"] else "")] for x in shown])
    print(table)
    common.write_sweep(args.out, {"rows": rows, "draws": [[ds.ids[i] for i in d] for d in DRAWS]},
                       f"{len(DRAWS)} draws of 4 support images, {len(queries)} query images in all; best "
                       f"{args.top} settings by PQ, the default and plain connected components", table)


if __name__ == "__main__":
    main()
