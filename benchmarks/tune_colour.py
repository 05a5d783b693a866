"""Colour inputs of the adapted head (``MAMLConfig.colour_features``, ``colour_check``): do RGB and haematoxylin /
eosin channels next to the backbone's features help on the query images, and does the support's two-fold
cross-check keep them where they help? DEV data only.

Every setting runs ``metahistoseg evaluate`` itself (``evaluation.evaluate``: the Adapt button's path, calibrations
included) on the same K support images per task and draw (``tune_adapt.dev_draws``' order; every other image of the
dev folder is a query). Settings: ``off`` (features only, the default before session 8), ``always`` (colour inputs
without the cross-check) and ``checked`` (the default: colour inputs kept if the cross-check says so).

    .venv/bin/python benchmarks/tune_colour.py --tasks bm_graz_cells,monuseg,cpm15,glas --draws 3

Writes ``benchmarks/results/tune_colour.{json,md}``.
"""

from __future__ import annotations

import dataclasses
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
    settings = evaluation.method_settings

    def patched(method, steps, s):
        name, cfg = settings(method, steps, s)
        return name, dataclasses.replace(cfg, **SETTINGS[setting])
    evaluation.method_settings = patched
    try:
        return run(evaluation.evaluate(DATA / task, ids, seed=seed,
                                       backbone=None if backbone == "default" else backbone))
    finally:
        evaluation.method_settings = settings


def main() -> None:
    a = dev_args(__doc__, "bm_graz_cells,monuseg,cpm15,glas", 3, "tune_colour",
                 lambda ap: ap.add_argument("--settings", default=",".join(SETTINGS)))
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
