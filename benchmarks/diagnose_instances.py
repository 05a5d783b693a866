"""What limits the nuclear instances (AJI/PQ): the nuclear-pixel (NP) map or the HV maps? DEV data only.

For every nuclear task and draw, the default adaptation runs on K support images and each query image is
predicted with instances (as ``metahistoseg evaluate``). The default post-processing (``HoVerPostConfig()``) is
then re-run on four combinations of maps: the predicted NP (the adapted head's foreground probability) and HV,
the true NP (the truth's nuclear mask) with the predicted HV, the predicted NP with the true HV
(:func:`~napari_metahistoseg.postprocess.hv_targets` of the truth instances), and both true. Replacing the map
that limits the result moves the scores most. It also reports where the predicted mask's errors lie, and the mIoU of
the true mask resampled to the model's resolution and back (what the model's µm/px alone would cost).

    .venv/bin/python benchmarks/diagnose_instances.py --tasks monuseg,cpm15 --draws 2

Writes ``benchmarks/results/diagnose_instances.{json,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tune_adapt import dev_args, dev_draws  # noqa: E402

from napari_metahistoseg.config import HoVerPostConfig, MAMLConfig  # noqa: E402
from napari_metahistoseg.inference import _resize_maps, predict  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import ConfusionAccumulator, aji, panoptic_quality  # noqa: E402
from napari_metahistoseg.pipeline import adapt, load_backbone  # noqa: E402
from napari_metahistoseg.postprocess import HoVerPostProcessor, hv_targets  # noqa: E402

COMBOS = ("predicted NP + predicted HV", "true NP + predicted HV", "predicted NP + true HV", "true NP + true HV")
FAR_PX = 3  # a false-positive pixel farther than this from every true nucleus lies outside any nucleus' rim


def mask_errors(pred: np.ndarray, inst: np.ndarray) -> dict:
    """Where the predicted nuclear mask is wrong: false positives next to a true nucleus (its rim) or away from
    all of them, false negatives in nuclei it finds or misses (< 20 % of the nucleus predicted)."""
    truth = inst > 0
    n = int(inst.max())
    cover = ndi.mean(pred, inst, np.arange(1, n + 1)) if n else np.zeros(0)
    missed = np.isin(inst, 1 + np.flatnonzero(cover < 0.2)) & truth
    fp, fn = pred & ~truth, ~pred & truth
    far = ndi.distance_transform_edt(~truth) > FAR_PX
    return {"fp_far": int((fp & far).sum()), "fp_rim": int((fp & ~far).sum()), "fn_missed": int((fn & missed).sum()),
            "fn_found": int((fn & ~missed).sum()), "nuclei": n, "missed_nuclei": int((cover < 0.2).sum())}


def resampled_truth(inst: np.ndarray, mpp: float, model_mpp: float) -> np.ndarray:
    """The true nuclear mask seen at the model's resolution and brought back as predictions are (bilinear)."""
    from skimage.transform import resize

    f = mpp / model_mpp
    small = resize((inst > 0).astype(np.float32), (round(inst.shape[0] * f), round(inst.shape[1] * f)), order=1,
                   anti_aliasing=f < 1)
    return _resize_maps(small[None].astype(np.float32), inst.shape)[0] >= 0.5


def unit(bb, ds, sup, qry, seed: int) -> list[dict]:
    head = run(adapt(bb, [s.image for s in sup], [s.semantic for s in sup], list(ds.class_names),
                     mpp=[s.mpp for s in sup], cfg=MAMLConfig(seed=seed)))
    post = HoVerPostProcessor(HoVerPostConfig())
    out = []
    for q in qry:
        pred = run(predict(bb, head, q.image, mpp=q.mpp, instances=True))
        mpp = q.mpp or bb.mpp
        true_np = (q.instances > 0).astype(np.float32)
        true_hv = hv_targets(q.instances).astype(np.float32)
        maps = {COMBOS[0]: None, COMBOS[1]: (true_np, pred.hv), COMBOS[2]: (pred.np_prob, true_hv),
                COMBOS[3]: (true_np, true_hv)}
        rec = {"id": q.sample_id, **mask_errors(pred.semantic > 0, q.instances)}
        ceiling = ConfusionAccumulator(2)
        ceiling.update(resampled_truth(q.instances, mpp, bb.mpp).astype(np.uint8), (q.instances > 0).astype(np.uint8))
        rec["resampled_truth_miou"] = ceiling.miou()
        for name, m in maps.items():
            inst = pred.instances if m is None else post.instances(np.clip(m[0], 0, 1).astype(np.float32),
                                                                   m[1].astype(np.float32), mpp)
            rec[name] = {"aji": float(aji(q.instances, inst)), "pq": float(panoptic_quality(q.instances, inst)["pq"])}
        out.append(rec)
    return out


def main() -> None:
    a = dev_args(__doc__, "monuseg,cpm15", 2, "diagnose_instances")
    bb = load_backbone(a.backbone)
    records = []
    for task, d, ds, sup, qry in dev_draws(a.tasks, a.draws):
        for rec in unit(bb, ds, sup, qry, seed=d):
            rec.update(task=task, draw=d, k=len(sup))
            records.append(rec)
            print(rec, file=sys.stderr, flush=True)
    rows, err_rows = [], []
    for task in a.tasks.split(","):
        rs = [r for r in records if r["task"] == task]
        rows.append([task, f"{rs[0]['k']} / {len(rs)}", *(f"{np.mean([r[c]['aji'] for r in rs]):.3f} / "
                                                         f"{np.mean([r[c]['pq'] for r in rs]):.3f}" for c in COMBOS)])
        tot = {k: sum(r[k] for r in rs) for k in ("fp_far", "fp_rim", "fn_missed", "fn_found", "nuclei",
                                                  "missed_nuclei")}
        err = tot["fp_far"] + tot["fp_rim"] + tot["fn_missed"] + tot["fn_found"]
        err_rows.append([task, *(f"{100 * tot[k] / max(err, 1):.0f} %" for k in ("fp_far", "fp_rim", "fn_found",
                                                                                 "fn_missed")),
                         f"{100 * tot['missed_nuclei'] / max(tot['nuclei'], 1):.1f} % of {tot['nuclei']}",
                         f"{np.mean([r['resampled_truth_miou'] for r in rs]):.3f}"])
    table = common.md_table(["task", "support images / query images (all draws)",
                             *(f"{c}: AJI / PQ" for c in COMBOS)], rows)
    table += "\n\nErrors of the predicted nuclear mask (share of all wrong pixels):\n\n" + common.md_table(
        ["task", f"false positive > {FAR_PX} px from any nucleus", f"false positive within {FAR_PX} px (rim)",
         "false negative in found nuclei", "false negative in missed nuclei", "missed nuclei (< 20 % predicted)",
         "mIoU of the truth resampled to the model's µm/px and back"],
        err_rows)
    note = (f"Backbone `{bb.name}` ({bb.sha256[:12]}); default adaptation and post-processing; true maps from the "
            "truth instances (`postprocess.hv_targets`); mean over query images.")
    common.write_sweep(a.out, {"records": records}, note, table)
    print(table)


if __name__ == "__main__":
    main()
