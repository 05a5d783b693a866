"""Few-shot evaluation on a data folder: adapt on support images, predict the rest, score against the truth.

This is what ``metahistoseg evaluate`` runs and what the benchmarks call. The default method and settings are
exactly the GUI's Adapt button (``MAMLConfig()`` on the bundled backbone). Instance truth is scored against HoVer
instances for nuclear tasks (median truth object < ``NUCLEUS_MAX_AREA_UM2``) and against large-object instances
of the semantic foreground (:func:`~napari_metahistoseg.postprocess.object_instances`, ``ObjectPostConfig()``:
holes filled, small objects removed, necks split) otherwise, e.g. glands.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import time
from collections.abc import Generator, Mapping, Sequence
from pathlib import Path

import numpy as np

from .config import MAMLConfig, ObjectPostConfig, PointsConfig, TilingConfig
from .data.readers import TaskDataset, open_dataset
from .data.task import IGNORE, Sample
from .inference import detect_points, predict
from .metrics import ConfusionAccumulator, aji, detection_scores, panoptic_quality
from .pipeline import adapt, load_backbone
from .postprocess import object_instances

log = logging.getLogger(__name__)

METHODS = ("maml", "transfer", "scratch")
NUCLEUS_MAX_AREA_UM2 = 250.0  # median truth object area below which instances are nuclei (HoVer post-processing)
SCRATCH = MAMLConfig(steps=60, inner_lr=0.05, adapt="all")  # training the same network from scratch


def method_settings(method: str, steps: int | None, seed: int) -> tuple[str, MAMLConfig]:
    """Backbone name and inner-loop settings of an evaluation method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cfg = SCRATCH if method == "scratch" else MAMLConfig()
    if steps is not None:
        if steps < 0:
            raise ValueError(f"--steps must be >= 0, got {steps}")
        cfg = dataclasses.replace(cfg, steps=steps)
    cfg = dataclasses.replace(cfg, seed=seed)
    return {"maml": "default", "transfer": "transfer", "scratch": "scratch"}[method], cfg


def with_overrides(cfg: MAMLConfig, overrides: Mapping[str, object]) -> MAMLConfig:
    """``cfg`` with some fields replaced; an unknown field name is a clear error (not a silent no-op)."""
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown MAMLConfig field(s) {unknown}; fields are {', '.join(sorted(known))}")
    return dataclasses.replace(cfg, **overrides)


def split_ids(ds: TaskDataset, support: Sequence[str]) -> tuple[list[str], list[str]]:
    sup = [s.strip() for s in support if s.strip()]
    if not sup:
        raise ValueError("give at least one support image id (--support ID[,ID...])")
    unknown = [s for s in sup if s not in ds.ids]
    if unknown:
        raise ValueError(f"{ds.root}: unknown support id(s) {unknown}; image ids are file stems such as "
                         f"{', '.join(ds.ids[:3])}")
    query = [i for i in ds.ids if i not in sup]
    if not query:
        raise ValueError(f"{ds.root}: every image is in the support; leave at least one for the query set")
    return sup, query


def _is_nuclear(samples: list[Sample]) -> bool:
    areas = []
    for s in samples:
        if s.instances is None:
            continue
        counts = np.bincount(s.instances.ravel())[1:]
        areas += list(counts[counts > 0] * (s.mpp or 0.5) ** 2)
    return bool(areas) and float(np.median(areas)) < NUCLEUS_MAX_AREA_UM2


def evaluate(
    data_dir: str | Path,
    support: Sequence[str],
    *,
    method: str = "maml",
    backbone: str | None = None,
    steps: int | None = None,
    devices: str | Sequence[str] = "cpu",
    seed: int = 0,
    out: str | Path | None = None,
    points_cfg: PointsConfig | None = None,
    tiling: TilingConfig | None = None,
    adapt_overrides: Mapping[str, object] | None = None,
) -> Generator[dict, None, dict]:
    """Run one few-shot evaluation; yields progress, returns the metrics dict (the CLI's JSON line). ``tiling``:
    the prediction's tiling and test-time augmentation (default ``TilingConfig()``, as the GUI).
    ``adapt_overrides``: ``MAMLConfig`` fields changed from the method's settings (benchmarks comparing adaptation
    settings through this same path, e.g. ``{"colour_features": False}``; segmentation data only)."""
    ds = open_dataset(data_dir)
    sup_ids, qry_ids = split_ids(ds, support)
    if ds.kind == "patches":
        from .mitosis_eval import evaluate_patches

        return (yield from evaluate_patches(ds, sup_ids, qry_ids, method=method, steps=steps, seed=seed,
                                            devices=devices, out=out))
    bb_name, cfg = method_settings(method, steps, seed)
    if adapt_overrides:
        cfg = with_overrides(cfg, adapt_overrides)
    bb = load_backbone(backbone if backbone not in (None, "default") else bb_name)
    sup = [ds.load(i) for i in sup_ids]
    t0 = time.time()
    head = yield from adapt(bb, [s.image for s in sup], [s.semantic for s in sup], list(ds.class_names),
                            mpp=[s.mpp for s in sup], cfg=cfg, devices=devices)
    adapt_s = time.time() - t0
    nuclear = ds.kind != "points" and _is_nuclear(sup)
    acc = ConfusionAccumulator(len(ds.class_names))
    inst_scores, det = [], []
    pcfg = points_cfg or PointsConfig()
    outdir = Path(out) if out else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    t1 = time.time()
    for k, qid in enumerate(qry_ids):
        q = ds.load(qid)
        pred = yield from predict(bb, head, q.image, mpp=q.mpp, devices=devices, instances=nuclear, tiling=tiling)
        acc.update(pred.semantic, q.semantic if q.semantic is not None else np.full(q.shape, IGNORE, np.uint8))
        if q.instances is not None and ds.kind != "points":
            inst = pred.instances if nuclear else object_instances(pred.semantic > 0, ObjectPostConfig(),
                                                                   q.mpp or bb.mpp)
            pq = panoptic_quality(q.instances, inst)
            inst_scores.append((aji(q.instances, inst), pq["pq"]))
            if outdir:
                _write_instances(outdir / f"{qid}.instances.tif", inst)
        if ds.kind == "points" and q.points is not None:
            pts, prob = detect_points(pred.probs[1:].sum(0), pcfg)
            det.append(detection_scores(pts, q.points, pcfg.match_radius_px))
            if outdir:
                _write_points(outdir / f"{qid}.points.csv", pts, pred.semantic, prob)
        if outdir:
            _write_semantic(outdir / f"{qid}.semantic.png", pred.semantic)
        yield {"stage": "evaluate", "done": k + 1, "total": len(qry_ids)}
    res = {"task": ds.task, "method": method, "n_support": len(sup_ids), "n_query": len(qry_ids),
           "miou": acc.miou(), "dice": acc.dice_foreground()}
    if inst_scores:
        res["aji"] = float(np.mean([a for a, _ in inst_scores]))
        res["pq"] = float(np.mean([p for _, p in inst_scores]))
    if det:
        tp, fp, fn = (sum(d[k] for d in det) for k in ("tp", "fp", "fn"))
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        res.update(det_precision=p, det_recall=r, det_f1=2 * p * r / max(p + r, 1e-12))
    res.update(adapt_seconds=round(adapt_s, 3), predict_seconds=round(time.time() - t1, 3),
               backbone=bb.name, steps=cfg.steps, adapt_mode=cfg.adapt, devices=head.provenance["devices"])
    return res


def _write_semantic(path: Path, sem: np.ndarray) -> None:
    from skimage import io as skio

    skio.imsave(path, sem.astype(np.uint8), check_contrast=False)


def _write_instances(path: Path, inst: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, inst.astype(np.uint32), compression="zlib")


def _write_points(path: Path, pts: np.ndarray, sem: np.ndarray, prob: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["x", "y", "class", "prob"])
        for (r, c), p in zip(pts, prob, strict=True):
            w.writerow([f"{c:.1f}", f"{r:.1f}", int(sem[int(r), int(c)]), f"{p:.4f}"])

