"""Sweep of the HoVer post-processing sizes and marker threshold (``HoVerPostConfig``) on the nuclear DEV tiles.

MoNuSeg (2 support draws × 4 queries), CPM-15 (2 × 4) and CoNSeP tiles (1 × 8 queries from other parent images):
the default adaptation on one support image, the adapted foreground probability and the backbone's HV maps are
computed once per query, then every setting is scored (AJI, PQ, DQ, and the predicted/true nucleus count ratio).

Run: ``.venv/bin/python benchmarks/tune_instances.py`` → prints the table (best mean PQ first) and writes
``benchmarks/results/tune_instances.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from napari_metahistoseg.config import HoVerPostConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.inference import predict  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import aji, panoptic_quality  # noqa: E402
from napari_metahistoseg.pipeline import adapt, load_backbone  # noqa: E402
from napari_metahistoseg.postprocess import HoVerPostProcessor  # noqa: E402

TASKS = (("monuseg", (0, 2), 4), ("cpm15", (0, 5), 4), ("consep_tiles", (0,), 8))  # (folder, support ids, queries)
_MAPS: list = []


def cache_maps(backbone: str = "default") -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]:
    bb = load_backbone(backbone)
    out = []
    for task, sups, nq in TASKS:
        ds = open_dataset(common.DATA / task)
        for si in sups:
            s = ds.load(ds.ids[si])
            head = run(adapt(bb, [s.image], [s.semantic], list(ds.class_names), mpp=[s.mpp]))
            cand = [i for i in ds.ids if i != ds.ids[si]]
            if task == "consep_tiles":  # queries from other parent images than the support tile
                cand = [i for i in cand if not i.startswith(ds.ids[si].rsplit("_", 1)[0])]
            rng = np.random.default_rng(si)
            for j in sorted(rng.choice(len(cand), size=min(nq, len(cand)), replace=False)):
                q = ds.load(cand[j])
                if q.instances is None or not q.instances.any():
                    continue
                p = run(predict(bb, head, q.image, mpp=q.mpp, instances=True))
                out.append((task, p.np_prob.astype(np.float32), p.hv.astype(np.float32), q.instances,
                            q.mpp or bb.mpp))
    return out


def _init(maps) -> None:
    _MAPS[:] = maps


def score(kw: dict) -> tuple[dict, dict]:
    post = HoVerPostProcessor(HoVerPostConfig(threads=1, **kw))
    res: dict[str, list] = {}
    for task, np_prob, hv, truth, mpp in _MAPS:
        inst = post.instances(np_prob, hv, mpp)
        pq = panoptic_quality(truth, inst)
        ratio = (len(np.unique(inst)) - 1) / max(len(np.unique(truth)) - 1, 1)  # predicted / true nuclei
        res.setdefault(task, []).append((aji(truth, inst), pq["pq"], pq["dq"], ratio))
    return kw, {t: np.mean(v, 0).tolist() for t, v in res.items()}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-object", default="2.5,5,8,11", help="min_object_area_um2 values")
    ap.add_argument("--min-marker", default="0.6,2,3,4.5", help="min_marker_area_um2 values")
    ap.add_argument("--marker-threshold", default="0.55,0.65,0.75")
    ap.add_argument("--sobel", default="8", help="sobel_kernel_um values")
    ap.add_argument("--backbone", default="default", help="'default' (bundled) or a checkpoint path")
    ap.add_argument("--out", default="tune_instances", help="results name under benchmarks/results/")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    maps = cache_maps(args.backbone)
    grid = [dict(min_object_area_um2=a, min_marker_area_um2=b, marker_threshold=c, sobel_kernel_um=k)
            for a, b, c, k in itertools.product(common.floats(args.min_object), common.floats(args.min_marker),
                                                common.floats(args.marker_threshold), common.floats(args.sobel))]
    with ProcessPoolExecutor(2, initializer=_init, initargs=(maps,)) as ex:
        results = list(ex.map(score, grid))
    d = HoVerPostConfig()
    rows = []
    for kw, r in results:
        rows.append(dict(**kw, per_task=r, mean_aji=float(np.mean([v[0] for v in r.values()])),
                         mean_pq=float(np.mean([v[1] for v in r.values()])),
                         default=all(getattr(d, k) == v for k, v in kw.items())))
    rows.sort(key=lambda x: -x["mean_pq"])
    tasks = [t for t, _, _ in TASKS]
    shown = rows[:args.top] + [x for x in rows[args.top:] if x["default"]]
    table = common.md_table(
        ["min object µm²", "min marker µm²", "marker threshold", "Sobel µm", "mean AJI", "mean PQ",
         *[f"{t} AJI / PQ / DQ / n ratio" for t in tasks], "default"],
        [[x["min_object_area_um2"], x["min_marker_area_um2"], x["marker_threshold"], x["sobel_kernel_um"],
          common.fmt(x["mean_aji"]),
          common.fmt(x["mean_pq"]), *[" / ".join(common.fmt(v, 2 if i == 3 else 3) for i, v in
                                                 enumerate(x["per_task"][t])) for t in tasks],
          "yes" if x["default"] else ""] for x in shown])
    print(table)
    common.write_sweep(args.out, {"rows": rows},
                       f"Best {args.top} settings by mean PQ over the three tasks, and the default", table)


if __name__ == "__main__":
    main()
