"""Decoder adaptation (``MAMLConfig(adapt="decoder")``) against head-only, by how many decoder blocks adapt.

Each setting runs ``metahistoseg evaluate``'s code (:func:`napari_metahistoseg.evaluation.evaluate`: adapt on the
support images, score every other image of the DEV folder) with its ``MAMLConfig``; support draws as in
``bench_fewshot.py`` (MoNuSeg: 1 image, 3 draws; GlaS: 4 images, 2 draws). Reports mIoU, AJI, PQ and the
adaptation wall time (support features + inner loop, 2 threads).

    .venv/bin/python benchmarks/tune_decoder.py --tasks monuseg,glas

Writes ``benchmarks/results/tune_decoder.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_fewshot import TASKS, TaskData  # noqa: E402

from napari_metahistoseg import evaluation  # noqa: E402
from napari_metahistoseg.config import MAMLConfig  # noqa: E402
from napari_metahistoseg.maml import run  # noqa: E402

SHOTS = {"monuseg": (1, 3), "glas": (4, 2), "cpm15": (1, 2)}  # task: (support images, draws)
METRICS = ("miou", "aji", "pq", "adapt_seconds")


def settings(steps: int, blocks: list[int]) -> dict[str, MAMLConfig]:
    out = {"head only (default, 20 steps)": MAMLConfig()}
    for b in blocks:
        which = "all decoder blocks" if b == 0 else f"last {b} decoder block{'s' if b > 1 else ''}"
        out[f"decoder: {which}, {steps} steps"] = MAMLConfig(adapt="decoder", steps=steps, decoder_blocks=b)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="monuseg,glas")
    ap.add_argument("--steps", type=int, default=10, help="decoder-mode inner steps")
    ap.add_argument("--blocks", default="0,2,1", help="MAMLConfig.decoder_blocks values (0 = all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="tune_decoder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = settings(args.steps, [int(b) for b in args.blocks.split(",")])
    records = []
    for task in args.tasks.split(","):
        spec, (k, draws) = TASKS[task], SHOTS[task]
        td = TaskData(task, spec)
        fixed = td.fixed_query(spec.max_query) if spec.fixed_query else None
        for d in range(draws):
            sids = td.support_order(d, k, fixed or [])
            for name, cfg in cfgs.items():
                evaluation.method_settings = lambda m, s, seed, cfg=cfg: ("default", cfg)
                r = run(evaluation.evaluate(common.DATA / spec.folder, sids))
                records.append({"task": task, "draw": d, "support": sids, "setting": name,
                                **{m: r[m] for m in METRICS if m in r}, "n_query": r["n_query"]})
                print(task, d, name, {m: round(r[m], 3) for m in METRICS if m in r}, file=sys.stderr, flush=True)
    rows = []
    for task in args.tasks.split(","):
        for name in cfgs:
            rs = [r for r in records if r["task"] == task and r["setting"] == name]
            rows.append([task, name, len(rs), rs[0]["n_query"],
                         *[common.fmt(float(np.mean([r[m] for r in rs])), 3 if m != "adapt_seconds" else 1)
                           for m in METRICS]])
    table = common.md_table(["task", "setting", "draws", "queries", "mIoU", "AJI", "PQ", "adapt s (mean)"], rows)
    print(table)
    common.write_sweep(args.out, {"records": records},
                       "evaluate() per setting and draw (every other image of the dev folder is a query); mean over "
                       "draws", table)


if __name__ == "__main__":
    main()
