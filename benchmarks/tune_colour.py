"""Colour inputs of the adapted head (``MAMLConfig.colour_features``, ``colour_check``): do RGB and haematoxylin /
eosin channels next to the backbone's features help on the query images, and does the support's two-fold
cross-check keep them where they help? DEV data only.

Every setting runs ``metahistoseg evaluate`` itself (``evaluation.evaluate``: the Adapt button's path, calibrations
included) on the same K support images per task and draw (``tune_adapt.dev_draws``' order; every other image of the
dev folder is a query). Settings: ``off`` (features only, the default before session 8), ``always`` (colour inputs
without the cross-check) and ``checked`` (the default: colour inputs kept if the cross-check says so).

    .venv/bin/python benchmarks/tune_colour.py --tasks bm_graz_cells,monuseg,cpm15,glas --draws 3

Writes ``benchmarks/results/tune_colour.{json,md}``.

``--fewshot NEW[,NEW...] --baseline OLD[,OLD...]`` instead reads two sets of ``bench_fewshot.py`` results (the
``maml`` records of the same units, new: with colour inputs and their cross-check recorded; old: features only) and
tabulates, per task and setting, how often the colour inputs were kept and what they did to the query mIoU, by the
cross-check's support gain (``--out`` names the table; no computation).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from tune_adapt import DATA, dev_args, dev_draws  # noqa: E402

import napari_metahistoseg.evaluation as evaluation  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402

SETTINGS = {"off": {"colour_features": False}, "always": {"colour_check": False}, "checked": {}}
METRICS = ("miou", "aji", "pq", "det_f1")


def evaluate_with(setting: str, task: str, ids: list[str], seed: int, backbone: str) -> dict:
    """``evaluation.evaluate`` with the Adapt button's ``MAMLConfig`` changed by ``SETTINGS[setting]``."""
    return run(evaluation.evaluate(DATA / task, ids, seed=seed, adapt_overrides=SETTINGS[setting],
                                   backbone=None if backbone == "default" else backbone))


def fewshot_table(new: list[str], old: list[str]) -> tuple[list[dict], str]:
    """Per unit of ``new``'s maml records: kept?, the cross-check's support gain, the query mIoU change against the
    same unit in ``old``; and a table per task, setting and gain band."""
    def maml(names):
        out = {}
        for n in names:
            for r in (common.read_json(n) or {}).get("records", []):
                if r["method"] == "maml":
                    out[(r["task"], r["setting"], r["x"], r["draw"])] = r
        return out
    before, after = maml(old), maml(new)
    units = []
    for key, r in after.items():
        if key not in before:
            continue
        c = r.get("colour_check")
        units.append({"task": key[0], "setting": key[1], "x": key[2], "draw": key[3], "kept": r.get("colour_kept"),
                      "check_gain": None if not c else round(c["colour"] - c["features"], 4),
                      "query_gain": round(r["miou"] - before[key]["miou"], 4)})
    bands = (("no check possible", lambda g: g is None), ("gain < 0", lambda g: g is not None and g < 0),
             ("0 ≤ gain < 0.005", lambda g: g is not None and 0 <= g < 0.005),
             ("0.005 ≤ gain < 0.02", lambda g: g is not None and 0.005 <= g < 0.02),
             ("gain ≥ 0.02", lambda g: g is not None and g >= 0.02))
    rows = []
    for task in dict.fromkeys(u["task"] for u in units):
        for k1 in (True, False):
            for band, test in bands:
                us = [u for u in units if u["task"] == task and (u["x"] == 1 or u["setting"] == "clicks") == k1
                      and test(u["check_gain"])]
                if not us:
                    continue
                kept = [u for u in us if u["kept"]]
                rows.append([task, "1 image" if k1 else "≥ 2 images",
                             band, len(us), len(kept),
                             f"{np.mean([u['query_gain'] for u in kept]):+.3f}" if kept else "–",
                             f"{min(u['query_gain'] for u in kept):+.3f} / {max(u['query_gain'] for u in kept):+.3f}"
                             if kept else "–"])
    table = common.md_table(["task", "support", "cross-check gain (colour − features, support mIoU)", "units",
                             "colour kept", "query mIoU change when kept (mean)", "min / max"], rows)
    return units, table


def main() -> None:
    a = dev_args(__doc__, "bm_graz_cells,monuseg,cpm15,glas", 3, "tune_colour",
                 lambda ap: [ap.add_argument("--settings", default=",".join(SETTINGS)),
                             ap.add_argument("--fewshot", default=None), ap.add_argument("--baseline", default=None)])
    if a.fewshot:
        units, table = fewshot_table(a.fewshot.split(","), a.baseline.split(","))
        note = (f"`maml` units of `{a.fewshot}` (colour inputs as they were then chosen) against the same units of "
                f"`{a.baseline}` (features only); K = 1 and clicked-centroid units are one support image.")
        common.write_sweep(a.out, {"units": units}, note, table)
        print(table)
        return
    settings = a.settings.split(",")
    records = []
    for task, d, _ds, sup, _ in dev_draws(a.tasks, a.draws):
        ids = [str(s.sample_id) for s in sup]
        for st in settings:
            t0 = time.time()
            r = evaluate_with(st, task, ids, d, a.backbone)
            rec = {"task": task, "draw": d, "setting": st, "support": ids, "n_query": r["n_query"],
                   **{m: r.get(m) for m in (*METRICS, "adapt_seconds", "predict_seconds")},
                   "seconds": round(time.time() - t0, 1)}
            records.append(rec)
            print(rec, file=sys.stderr, flush=True)
    rows = []
    for task in a.tasks.split(","):
        for st in settings:
            rs = [r for r in records if r["task"] == task and r["setting"] == st]
            if not rs:
                continue
            vals = [f"{np.mean([r[m] for r in rs]):.3f}" if rs[0].get(m) is not None else "—" for m in METRICS]
            rows.append([task, len(rs[0]["support"]), len(rs), st, *vals,
                         f"{np.median([r['adapt_seconds'] for r in rs]):.2f}"])
    table = common.md_table(["task", "K", "draws", "setting", "mIoU", "AJI", "PQ", "det F1", "adapt s (median)"],
                            rows)
    note = ("Each row: `evaluation.evaluate` (calibrations included) on the same supports per draw, mean over the "
            "draws; `off` = features only, `always` = colour inputs without the cross-check, `checked` = the "
            "default (kept when the support's two-fold cross-check says so).")
    common.write_sweep(a.out, {"records": records}, note, table)
    print(table)


if __name__ == "__main__":
    main()
