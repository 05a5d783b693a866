"""Pick the GUI's default head-only adaptation settings (steps, inner lr, learned per-tensor lrs) on DEV data.

Features of support and query images are computed once per task; every setting then only re-runs the head's
inner loop and the head on the cached query features, so a grid costs seconds per point.

    .venv/bin/python benchmarks/tune_adapt.py --backbone napari_metahistoseg/weights/backbone

Writes benchmarks/results/tune_adapt.json and .md (dev splits only; the held-out split is never seen).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_metahistoseg.config import MAMLConfig, TilingConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.maml import adapt_head_on_pixels, head_pixel_logits, pixel_support, run  # noqa: E402
from napari_metahistoseg.metrics import ConfusionAccumulator  # noqa: E402
from napari_metahistoseg.models import PixelHead  # noqa: E402
from napari_metahistoseg.pipeline import _features, _learned_lrs, initial_head, load_backbone, rescale, support_balance  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
TASKS = {"monuseg": (1, 4), "glas": (4, 8), "bm_graz_cells": (1, 3), "cpm15": (2, 6), "consep_tiles": (8, 24)}


def dev_args(doc: str, tasks: str, draws: int, out: str, extra=None) -> argparse.Namespace:
    """The options of the per-task, per-draw DEV sweeps (``--tasks --draws --backbone --threads --out``, plus what
    ``extra(parser)`` adds), parsed; torch's thread count is set."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if extra is not None:
        extra(ap)
    ap.add_argument("--tasks", default=tasks)
    ap.add_argument("--draws", type=int, default=draws)
    ap.add_argument("--backbone", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=out)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a


def dev_draws(tasks: str, draws: int):
    """For every task (comma-separated) and draw ``d``: ``(task, d, dataset, support samples, query samples)``, with
    :data:`TASKS`' K support and query images of the dev folder in the order ``default_rng(d)`` shuffles them."""
    for task in tasks.split(","):
        ds = open_dataset(DATA / task)
        k, nq = TASKS[task]
        for d in range(draws):
            ids = list(np.random.default_rng(d).permutation(ds.ids))
            yield task, d, ds, [ds.load(i) for i in ids[:k]], [ds.load(i) for i in ids[k:k + nq]]


def adapt_binary_cached(bb, sup, cfg: MAMLConfig):
    """The head-only adaptation of ``pipeline.adapt`` for a two-class task on ``cached`` support features (same pixel
    sampling, start and inner loop) on the backbone's features only — the head of sessions 6–7, on which the
    threshold and smoothing sweeps were run (``MAMLConfig.colour_features``, session 8, is measured end to end by
    ``tune_colour.py``): ``(head template, fast weights, pixel features x, labels y)``."""
    balance = support_balance(cfg, [lab for _, lab, _ in sup], 2)
    xs, ys = zip(*[pixel_support(f[None], torch.from_numpy(lab)[None], 2, max_pixels=cfg.max_support_pixels
                                 // len(sup), seed=cfg.seed + i, stratified=balance)
                   for i, (f, lab, _) in enumerate(sup)], strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    head = PixelHead(bb.model.backbone.out_channels, 2, bb.model.cfg.head_hidden)
    init = {k.split("heads.user.")[1]: v for k, v in initial_head(bb, 2, seed=cfg.seed).items()}
    fast = run(adapt_head_on_pixels(head, init, x, y, n_classes=2, steps=cfg.steps, lr=cfg.inner_lr,
                                    balance=balance, lrs=_learned_lrs(bb, init, cfg)))
    return head, fast, x, y


def cached(bb, samples):
    out = []
    for s in samples:
        f = (s.mpp or bb.mpp) / bb.mpp
        im, lab = rescale(s.image, f, order=1), rescale(s.semantic, f, order=0)
        out.append((run(_features(bb.model, im, torch.device("cpu"), TilingConfig())), lab, s.semantic))
    return out


def score(bb, sup, qry, n_cls, cfg: MAMLConfig) -> float:
    balance = support_balance(cfg, [lab for _, lab, _ in sup], n_cls)
    xs, ys = zip(*[pixel_support(f[None], torch.from_numpy(lab)[None], n_cls, max_pixels=cfg.max_support_pixels
                                 // len(sup), seed=cfg.seed, stratified=balance) for f, lab, _ in sup], strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    head = PixelHead(bb.model.backbone.out_channels, n_cls, bb.model.cfg.head_hidden)
    init = {k.split("heads.user.")[1]: v for k, v in initial_head(bb, n_cls, seed=cfg.seed).items()}
    fast = run(adapt_head_on_pixels(head, init, x, y, n_classes=n_cls, steps=cfg.steps, lr=cfg.inner_lr,
                                    balance=balance, lrs=_learned_lrs(bb, init, cfg)))
    acc = ConfusionAccumulator(n_cls)
    with torch.no_grad():
        for f, _, truth in qry:
            logits = head_pixel_logits(head, fast, f.reshape(f.shape[0], -1).t())
            prob = logits.softmax(1).t().reshape(n_cls, *f.shape[1:])
            prob = torch.nn.functional.interpolate(prob[None], size=truth.shape, mode="bilinear")[0]
            acc.update(prob.argmax(0).numpy().astype(np.uint8), truth)
    return acc.miou()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="default")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--steps", default="20,50,100", help="comma-separated inner-loop step counts")
    ap.add_argument("--lrs", default="0.01,0.1,1.0", help="comma-separated inner learning rates")
    ap.add_argument("--pixels", default="200000", help="comma-separated MAMLConfig.max_support_pixels values")
    ap.add_argument("--learned", default="false,true", help="comma list of learn_inner_lr settings")
    ap.add_argument("--balance", default="auto", help="comma list of class_balance settings (true,false,auto)")
    ap.add_argument("--out", default="tune_adapt", help="results name under benchmarks/results/")
    a = ap.parse_args()
    torch.set_num_threads(2)
    bb = load_backbone(a.backbone)
    grid = list(itertools.product([int(v) for v in a.steps.split(",")], [float(v) for v in a.lrs.split(",")],
                                  [v.strip().lower() == "true" for v in a.learned.split(",")],
                                  [int(v) for v in a.pixels.split(",")],
                                  [{"true": True, "false": False}.get(v.strip().lower(), v.strip())
                                   for v in a.balance.split(",")]))
    results: dict = {}
    for task in a.tasks.split(","):
        ds = open_dataset(DATA / task)
        k, nq = TASKS[task]
        for d in range(a.draws):
            rng = np.random.default_rng(d)
            ids = list(rng.permutation(ds.ids))
            sup = cached(bb, [ds.load(i) for i in ids[:k]])
            qry = cached(bb, [ds.load(i) for i in ids[k:k + nq]])
            for steps, lr, learned, px, bal in grid:
                cfg = MAMLConfig(steps=steps, inner_lr=lr, learn_inner_lr=learned, seed=d, max_support_pixels=px,
                                 class_balance=bal)
                m = score(bb, sup, qry, len(ds.class_names), cfg)
                results.setdefault(f"{steps}|{lr}|{learned}|{px}|{bal}", {}).setdefault(task, []).append(m)
                print(task, d, steps, lr, learned, px, bal, round(m, 4), file=sys.stderr, flush=True)
            print(task, d, "done", file=sys.stderr, flush=True)
    rows = []
    for key, per_task in results.items():
        means = {t: float(np.mean(v)) for t, v in per_task.items()}
        rows.append((float(np.mean(list(means.values()))), key, means))
    rows.sort(reverse=True)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.out}.json").write_text(json.dumps({"backbone": a.backbone, "command": " ".join(sys.argv),
                                                   "rows": rows}, indent=1))
    tasks = a.tasks.split(",")
    lines = ["| steps | inner lr | learned lrs | max support px | class balance | mean mIoU | " + " | ".join(tasks)
             + " |", "|---" * (6 + len(tasks)) + "|"]
    for mean, key, means in rows:
        s, lr, le, px, bal = key.split("|")
        lines.append(f"| {s} | {lr} | {le} | {px} | {bal} | {mean:.3f} | " + " | ".join(
            f"{means.get(t, float('nan')):.3f}" for t in tasks) + " |")
    (out / f"{a.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))


if __name__ == "__main__":
    main()
