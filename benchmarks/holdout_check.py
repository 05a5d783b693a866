"""Backbones compared on held-out images of their training sources, through the `evaluate` command's own path.

The held-out folders come from ``scripts/pack_training_data.py --holdout ... --holdout-out DIR`` (images kept out
of a training pack, written as unified task folders). Each backbone is evaluated with the default method (what the
GUI's Adapt button does) on every ``TASK:ID[,ID...]`` support draw; every other image of the folder is a query.
A backbone that was trained on the held-out images (the bundled one, ``default``) gives an optimistic bound.

    .venv/bin/python benchmarks/holdout_check.py --holdout runs/holdout \
        --backbones 'bundled=default,200+40 steps=runs/h_200_40/last' \
        --draws monuseg:TCGA-21-5784-01Z-00-DX1 --draws glas:testB_1,testB_10,testB_11,testB_12

Writes ``benchmarks/results/<--out>.{json,md}`` (default ``holdout_check``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCORES = ("miou", "aji", "pq")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--holdout", required=True, help="folder of held-out task folders (pack --holdout-out)")
    ap.add_argument("--backbones", required=True, help="comma list of LABEL=default|PATH")
    ap.add_argument("--draws", action="append", required=True, help="TASK:ID[,ID...] (repeatable)")
    ap.add_argument("--out", default="holdout_check")
    args = ap.parse_args(argv)

    from napari_metahistoseg.evaluation import evaluate
    from napari_metahistoseg.maml import run

    backbones = [spec.split("=", 1) for spec in args.backbones.split(",")]
    draws = [d.split(":", 1) for d in args.draws]
    rows = []
    for label, path in backbones:
        for task, ids in draws:
            res = run(evaluate(Path(args.holdout) / task, ids.split(","), backbone=path))
            rows.append({"backbone": label, "path": path, "task": task, "support": ids,
                         **{k: res.get(k) for k in (*SCORES, "n_query")}})
            print(rows[-1], flush=True)
    per_draw = common.md_table(
        ["backbone", "task", "support", "queries", *SCORES],
        [[r["backbone"], r["task"], r["support"], r["n_query"], *(r[k] if r[k] is not None else "–" for k in SCORES)]
         for r in rows])
    means = []
    for label, _ in backbones:
        for task in dict.fromkeys(t for t, _ in draws):
            sel = [r for r in rows if r["backbone"] == label and r["task"] == task]
            means.append([label, task, len(sel), *(common.fmt(statistics.mean(r[k] for r in sel))
                                                   if all(r[k] is not None for r in sel) else "–" for k in SCORES)])
    mean_table = common.md_table(["backbone", "task", "draws", *(f"mean {k}" for k in SCORES)], means)
    common.write_sweep(args.out, {"rows": rows, "holdout": args.holdout},
                       f"Held-out images in `{args.holdout}`; default method (maml, head adaptation) per draw.",
                       mean_table + "\n\nPer draw:\n\n" + per_draw)
    print(mean_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
