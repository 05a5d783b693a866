"""Sweep: the HoVer NP branch blended into the adapted foreground probability as the instance mask.

``np = w · NP(HoVer branch) + (1 − w) · P(foreground | adapted head)``, then the default HoVer post-processing,
scored (AJI, PQ) against the true instances; ``mIoU`` is the pooled two-class mIoU of the same map thresholded at
``HoVerPostConfig.np_threshold`` as a semantic map (the ``semantic`` row: the default semantic map of ``predict``,
for comparison). ``w = 0`` is ``np_source="adapted"``, ``w = 1`` is ``np_source="hover"``; the default,
``np_source="blend"``, is ``w = 0.75`` with a 2 µm gate (``--gate-um 2``). Run with the bundled backbone, whose
HoVer branch was trained on these dev images, and with
the leave-one-task-out backbone that never saw the task (``runs/loto_monuseg/last``, ``configs/loto_monuseg.json``):
a gain that shows only with the first is the branch remembering its training images.

Each draw adapts the default head on one image (full labels) and predicts up to 4 other images of the set.

    .venv/bin/python benchmarks/tune_np_blend.py [--backbones default,runs/loto_monuseg/last] [--set monuseg]
        [--draws 5] [--weights 0,0.25,0.5,0.75,1]

Writes ``benchmarks/results/tune_np_blend.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", default="default,runs/loto_monuseg/last")
    ap.add_argument("--set", default="monuseg", help="a dev data set's name, or a data folder")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--gate-um", default="",
                    help="comma list of gate radii (µm): the HoVer NP is capped by the adapted foreground probability "
                         "max-filtered over this radius (keeps the user's task: nuclei the head rejects stay out)")
    ap.add_argument("--out", default="tune_np_blend")
    args = ap.parse_args(argv)

    import torch

    from napari_metahistoseg.config import HoVerPostConfig, MAMLConfig
    from napari_metahistoseg.data import open_dataset
    from napari_metahistoseg.inference import blend_np, predict
    from napari_metahistoseg.maml import run
    from napari_metahistoseg.metrics import ConfusionAccumulator, aji, panoptic_quality
    from napari_metahistoseg.pipeline import adapt, load_backbone
    from napari_metahistoseg.postprocess import HoVerPostProcessor

    weights = common.floats(args.weights)
    gates = [None] + common.floats(args.gate_um) if args.gate_um else [None]
    variants = [(w, g) for w in weights for g in gates if not (g is not None and w == 0)]
    ds = open_dataset(args.set if Path(args.set).is_dir() else common.DATA / args.set)  # a dev set's name or a folder
    post = HoVerPostProcessor(HoVerPostConfig())
    rows = []
    for name in args.backbones.split(","):
        bb = load_backbone(name if name == "default" else str(common.REPO / name))
        scores = {v: {"aji": [], "pq": []} for v in variants}
        conf = {v: ConfusionAccumulator(2) for v in variants + ["semantic"]}
        for d in range(args.draws):
            sid = ds.ids[d % len(ds.ids)]
            s = ds.load(sid)
            head = run(adapt(bb, [s.image], [s.semantic], list(ds.class_names), mpp=s.mpp, cfg=MAMLConfig()))
            for qid in [i for i in ds.ids if i != sid][:4]:
                q = ds.load(qid)
                pred = run(predict(bb, head, q.image, mpp=q.mpp, instances=True, np_source="hover"))
                adapted = pred.probs[1:].sum(0)
                truth_fg = (q.semantic > 0).astype(np.uint8)
                conf["semantic"].update((pred.semantic > 0).astype(np.uint8), truth_fg)
                fg_t, hov_t = (torch.from_numpy(np.ascontiguousarray(x, np.float32))[None, None]
                               for x in (adapted, pred.np_prob))
                for w, g in variants:  # the library's blend, here at the image's resolution
                    gate_px = 0 if g is None else int(round(g / (q.mpp or bb.mpp)))
                    npm = np.clip(blend_np(fg_t, hov_t, w, gate_px)[0, 0].numpy(), 0, 1).astype(np.float32)
                    inst = post.instances(npm, pred.hv.astype(np.float32), q.mpp)
                    conf[(w, g)].update((npm >= post.cfg.np_threshold).astype(np.uint8), truth_fg)
                    scores[(w, g)]["aji"].append(aji(q.instances, inst))
                    scores[(w, g)]["pq"].append(panoptic_quality(q.instances, inst)["pq"])
        for w, g in variants:
            sc = scores[(w, g)]
            rows.append({"backbone": name, "weight": w, "gate_um": g, "aji": float(np.mean(sc["aji"])),
                         "pq": float(np.mean(sc["pq"])), "miou": conf[(w, g)].miou(), "n_queries": len(sc["aji"])})
            print(rows[-1], flush=True)
        rows.append({"backbone": name, "weight": "semantic", "gate_um": None, "aji": None, "pq": None,
                     "miou": conf["semantic"].miou(), "n_queries": len(scores[variants[0]]["aji"])})
        print(rows[-1], flush=True)
    table = common.md_table(["backbone", "w (HoVer NP)", "gate µm", "AJI", "PQ", "mIoU", "query images (all draws)"],
                            [[r["backbone"], r["weight"], "–" if r["gate_um"] is None else r["gate_um"],
                              "–" if r["aji"] is None else r["aji"], "–" if r["pq"] is None else r["pq"], r["miou"],
                              r["n_queries"]] for r in rows])
    common.write_sweep(args.out, {"rows": rows, "set": args.set, "draws": args.draws},
                       f"Task `{args.set}`, {args.draws} draws of 1 support image (full labels), up to 4 queries "
                       f"each; default adaptation and post-processing; mean over query images.", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
