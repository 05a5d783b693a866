"""Benchmark: few-shot curves (metric vs number of support images) per task, methods side by side.

    .venv/bin/python benchmarks/bench_fewshot.py                      # full run (bundled backbones)
    .venv/bin/python benchmarks/bench_fewshot.py --quick --backbone runs/backbone/last --transfer runs/backbone/last
    .venv/bin/python benchmarks/bench_fewshot.py --loto               # leave-one-task-out table only

Methods (same support/query splits for all):

* ``maml``     — bundled meta-trained backbone + the GUI's default adaptation (``MAMLConfig()``: head only);
* ``transfer`` — bundled transfer-learning backbone (supervised multi-task phase only), same adaptation;
* ``scratch``  — the same network with random weights trained on the support (``evaluation.SCRATCH``);
* ``rf``       — ilastik-style random forest on multiscale filter features (``baselines.py``).

Protocol (details in BENCHMARKS.md):

* **Splits.** Draw ``d`` picks ``K_max`` support images at random (seeded by task and draw); the K-shot support
  is the first K of them (nested). Small sets (MoNuSeg, CPM-15, BM-Graz): the query is every other image, at
  most ``--max-query`` of them (in the draw's random order). Large sets (GlaS, CoNSeP): one fixed query set per
  task (seed 0, ``--max-query`` images; for CoNSeP tiles of whole parent images that never give support tiles),
  the support drawn from the rest, so every K and draw is scored on the same images.
* **Metrics** exactly as ``metahistoseg evaluate`` computes them: mIoU (pixels pooled over the query set,
  classes absent from truth and prediction skipped), foreground Dice, AJI and PQ per image then averaged
  (nuclear tasks: HoVer instances from the adapted foreground probability, connected components for the RF,
  which has no HV maps; GlaS: the large-object instances of ``evaluate``, ``object_instances`` with
  ``ObjectPostConfig()``, for every method), detection precision/recall/F1 for point data (matching radius 12 px).
* **Sparse support** (``sparse``): only a random 10 % of the objects of each class (at least one) are painted,
  plus background strokes (random 3 px wide lines kept 2 px away from any object); everything else unknown.
* **Clicked centroids** (BM-Graz ``clicks``): a random square window of one support image that contains exactly N
  annotated centroids is fully annotated (circles of radius 12 px + background in the window; the parts of
  circles of centroids outside the window stay unknown); the rest of the image is unknown.

Speed-up that keeps the numbers of the GUI path: for the head-only methods (maml, transfer) the backbone features
of each image are computed once (``pipeline._features``, the function ``adapt`` uses) and reused across K, draws
and methods; adaptation then runs the same pixel sampling and inner loop as ``pipeline.adapt`` and prediction
applies the adapted head to the cached features. ``--check`` compares this against ``pipeline.adapt`` +
``inference.predict`` (and ``evaluation.evaluate`` on MoNuSeg) and stores the differences in the JSON.

Writes ``benchmarks/results/<out>.{json,md}`` and ``<out>_<task>.png`` (``--out fewshot`` by default;
``loto.{json,md}`` for ``--loto``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from baselines import PixelRandomForest, RFConfig, rf_features  # noqa: E402

from napari_metahistoseg.config import HoVerPostConfig, MAMLConfig, ObjectPostConfig, PointsConfig, TilingConfig  # noqa: E402
from napari_metahistoseg.data import open_dataset  # noqa: E402
from napari_metahistoseg.data.points import points_to_masks  # noqa: E402
from napari_metahistoseg.data.task import IGNORE, Sample  # noqa: E402
from napari_metahistoseg.evaluation import SCRATCH, _is_nuclear, evaluate  # noqa: E402
from napari_metahistoseg.inference import (  # noqa: E402
    Prediction,
    _resize_maps,
    decide,
    detect_points,
    head_input,
    nuclear_pixel_map,
    predict,
)
from napari_metahistoseg.maml import run  # noqa: E402
from napari_metahistoseg.metrics import ConfusionAccumulator, aji, detection_scores, panoptic_quality  # noqa: E402
from napari_metahistoseg.models import to_tensor_image  # noqa: E402
from napari_metahistoseg.pipeline import (  # noqa: E402
    CONTEXT_PX,
    TASK,
    AdaptedHead,
    Backbone,
    _crop_to_labels,
    _features,
    adapt,
    calibrates,
    colour_sigmas,
    fit_head,
    gaussian_smooth,
    image_colour_stats,
    initial_head,
    load_backbone,
    rescale,
    support_balance,
    support_part,
)
from napari_metahistoseg.postprocess import HoVerPostProcessor, object_instances  # noqa: E402

log = logging.getLogger("bench_fewshot")

SPARSE_OBJECT_FRACTION = 0.10  # painted fraction of the objects of each class (at least one per class)
SPARSE_STROKES = 8  # background strokes per support image
SPARSE_STROKE_WIDTH_PX = 3
SPARSE_STROKE_LENGTH = 0.3  # stroke length as a fraction of the shorter image side
SPARSE_STROKE_CLEARANCE_PX = 2  # background strokes stay this far from any object
CLICK_WINDOW_TRIES = 5000
QUERY_TILES_PER_PARENT = 2  # fixed query sets of tiled data sets spread over several parent images
HEAD_ONLY = ("maml", "transfer")


@dataclass(frozen=True)
class TaskSpec:
    folder: str
    ks: tuple[int, ...]
    max_query: int
    fixed_query: bool = False  # one query set for every draw and K (large data sets)
    clicks: tuple[int, ...] = ()  # BM-Graz: annotated-centroid counts of the clicks setting
    sparse: bool = True  # run the sparse-support setting (when asked for)


TASKS = {
    "monuseg": TaskSpec("monuseg", (1, 2, 4), 4),
    "cpm15": TaskSpec("cpm15", (1, 2, 4, 8), 3),
    "consep": TaskSpec("consep_tiles", (1, 2, 4, 8), 6, fixed_query=True),
    "glas": TaskSpec("glas", (1, 2, 4, 8), 4, fixed_query=True),
    "bm_graz": TaskSpec("bm_graz_cells", (1,), 2, clicks=(10, 25, 50, 100), sparse=False),
}
LOTO_TASKS = ("monuseg", "glas")
PAPER_TABLE1 = {"monuseg": (0.669, 0.676), "glas": (0.557, 0.556)}  # MAML / TransferL mIoU, new task


# ------------------------------------------------------------------------------------------------ data + splits


def _seed(task: str, draw: int) -> list[int]:
    return [zlib.crc32(task.encode()), draw]


def _parent(sample_id: str) -> str:
    """CoNSeP tile ``train_10_003`` → parent image ``train_10`` (other ids are their own parent)."""
    parts = sample_id.split("_")
    return "_".join(parts[:-1]) if len(parts) >= 3 and parts[-1].isdigit() else sample_id


class TaskData:
    """A task folder opened once: samples cached, splits drawn reproducibly."""

    def __init__(self, name: str, spec: TaskSpec) -> None:
        self.name, self.spec = name, spec
        self.ds = open_dataset(common.DATA / spec.folder)
        self._samples: dict[str, Sample] = {}

    def load(self, sid: str) -> Sample:
        if sid not in self._samples:
            self._samples[sid] = self.ds.load(sid)
        return self._samples[sid]

    def informative(self, sid: str) -> bool:
        sem = self.load(sid).semantic
        return sem is not None and len(np.setdiff1d(np.unique(sem), [IGNORE])) >= 2

    def fixed_query(self, max_query: int) -> list[str]:
        rng = np.random.default_rng(_seed(self.name, 0) + [99])
        parents = sorted({_parent(i) for i in self.ds.ids})
        query: list[str] = []
        for p in rng.permutation(parents):
            if len(query) >= max_query:
                break
            tiles = [i for i in self.ds.ids if _parent(i) == p]
            query += [str(t) for t in rng.permutation(tiles)[: min(QUERY_TILES_PER_PARENT, max_query - len(query))]]
        return query

    def support_order(self, draw: int, kmax: int, exclude: list[str]) -> list[str]:
        """``kmax`` support ids of draw ``draw`` (images with at least two labelled classes), nested over K."""
        rng = np.random.default_rng(_seed(self.name, draw))
        banned = {_parent(i) for i in exclude} if self.spec.fixed_query else set(exclude)
        pool = [i for i in self.ds.ids if (_parent(i) if self.spec.fixed_query else i) not in banned]
        out = []
        for sid in rng.permutation(pool):
            if self.informative(sid):
                out.append(str(sid))
            if len(out) == kmax:
                break
        return out

    def query_for(self, support: list[str], draw: int, max_query: int, fixed: list[str] | None) -> list[str]:
        if fixed is not None:
            return fixed
        rng = np.random.default_rng(_seed(self.name, draw) + [1])
        rest = [i for i in rng.permutation(self.ds.ids) if i not in support]
        return [str(i) for i in rest[:max_query]]


# ------------------------------------------------------------------------------------------------ label protocols


def sparse_labels(s: Sample, rng: np.random.Generator) -> np.ndarray:
    """Objects of each class painted with probability ``SPARSE_OBJECT_FRACTION`` (≥ 1 per class) + background
    strokes; everything else IGNORE. ``(H, W) uint8``."""
    from scipy import ndimage as ndi
    from skimage.draw import line

    sem = s.semantic
    inst = s.instances if s.instances is not None else ndi.label(sem > 0)[0]
    out = np.full(sem.shape, IGNORE, np.uint8)
    ids = np.unique(inst[inst > 0])
    if ids.size:
        cls = np.array([np.bincount(sem[inst == i][sem[inst == i] != IGNORE], minlength=1).argmax() for i in ids])
        for c in np.unique(cls[cls > 0]):
            members = ids[cls == c]
            n = max(1, int(round(SPARSE_OBJECT_FRACTION * len(members))))
            keep = np.isin(inst, rng.choice(members, n, replace=False))
            out[keep] = sem[keep]
    far_bg = ~ndi.binary_dilation(sem != 0, iterations=SPARSE_STROKE_CLEARANCE_PX) & (sem == 0)
    h, w = sem.shape
    length = SPARSE_STROKE_LENGTH * min(h, w)
    strokes = np.zeros(sem.shape, bool)
    for _ in range(SPARSE_STROKES):
        r0, c0 = rng.uniform(0, h), rng.uniform(0, w)
        a = rng.uniform(0, np.pi)
        r1 = np.clip(r0 + length * np.sin(a), 0, h - 1)
        c1 = np.clip(c0 + length * np.cos(a), 0, w - 1)
        rr, cc = line(int(min(r0, h - 1)), int(min(c0, w - 1)), int(r1), int(c1))
        strokes[rr, cc] = True
    strokes = ndi.binary_dilation(strokes, iterations=SPARSE_STROKE_WIDTH_PX // 2)
    out[strokes & far_bg] = 0
    return out


def click_window_labels(s: Sample, n: int, rng: np.random.Generator, radius: float) -> tuple[np.ndarray, tuple]:
    """Full-size labels with one square window holding exactly ``n`` centroids fully annotated, rest IGNORE.
    Returns the labels and the window ``(r0, c0, side)``."""
    pts = s.points
    h, w = s.shape
    side0 = np.sqrt(n * h * w / max(len(pts), 1))
    for _ in range(CLICK_WINDOW_TRIES):
        side = int(np.clip(side0 * rng.uniform(0.7, 1.4), 4 * radius, min(h, w)))
        r0, c0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        inside = (pts[:, 0] >= r0) & (pts[:, 0] < r0 + side) & (pts[:, 1] >= c0) & (pts[:, 1] < c0 + side)
        if inside.sum() == n:
            break
    else:
        raise RuntimeError(f"{s.sample_id}: no window with exactly {n} points found")
    local = pts[inside] - [r0, c0]
    win, _ = points_to_masks(local, None, (side, side), radius, background="background")
    reach = radius + 1  # pixel centres vs rounded point positions: one pixel of slack
    near = ~inside & (pts[:, 0] > r0 - reach) & (pts[:, 0] < r0 + side + reach) & \
        (pts[:, 1] > c0 - reach) & (pts[:, 1] < c0 + side + reach)
    if near.any():  # unannotated cells cut by the window border stay unknown
        pad = int(np.ceil(reach))
        others = pts[near] - [r0, c0]  # within (-reach, side + reach): inside the padded frame
        big, _ = points_to_masks(others + pad, None, (side + 2 * pad, side + 2 * pad), radius)
        cut = big[pad:pad + side, pad:pad + side] != IGNORE
        win[cut & (win == 0)] = IGNORE
    out = np.full((h, w), IGNORE, np.uint8)
    out[r0:r0 + side, c0:c0 + side] = win
    return out, (r0, c0, side)


# ------------------------------------------------------------------------------------------------ cached GUI path


class FeatureCache:
    """Backbone features ``(F, h, w)`` of whole images at the model resolution, per (backbone, task, image)."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str, str], torch.Tensor] = {}
        self.seconds = 0.0

    def get(self, bb: Backbone, task: str, s: Sample) -> torch.Tensor:
        key = (bb.sha256, task, s.sample_id)
        if key not in self.store:
            t0 = time.time()
            self.store[key] = run(_features(bb.model, _model_image(bb, s), torch.device("cpu"), TilingConfig()))
            self.seconds += time.time() - t0
        return self.store[key]

    def clear(self) -> None:
        self.store.clear()


def _model_labels(bb: Backbone, s: Sample, lab: np.ndarray) -> np.ndarray:
    return rescale(lab.astype(np.uint8), (s.mpp or bb.mpp) / bb.mpp, order=0)


def can_use_cache(bb: Backbone, supports: list[Sample], labels: list[np.ndarray]) -> bool:
    """True when ``pipeline.adapt`` would compute features of the whole image (labels reach every border)."""
    for s, lab in zip(supports, labels, strict=True):
        lab2 = _model_labels(bb, s, lab)
        if _crop_to_labels(lab2[..., None], lab2, CONTEXT_PX)[1].shape != lab2.shape:
            return False
    return True


def _model_image(bb: Backbone, s: Sample) -> np.ndarray:
    return rescale(s.image, (s.mpp or bb.mpp) / bb.mpp, order=1)


def adapt_cached(bb: Backbone, feats: list[torch.Tensor], labels: list[np.ndarray], classes: list[str],
                 cfg: MAMLConfig, samples: list[Sample]) -> AdaptedHead:
    """``pipeline.adapt`` head-only on cached whole-image features: the library's own per-image support step and
    head fit (``pipeline.support_part``, ``fit_head``: same sampling, colour inputs, init, inner loop and
    calibrations)."""
    n_cls = len(classes)
    balance = support_balance(cfg, labels, n_cls)
    calibrating = calibrates(cfg, labels, n_cls)
    sig_um, _ = colour_sigmas(cfg, labels, bb.mpp)
    stats = [image_colour_stats(s.image, cfg.colour_tissue_min_od) if sig_um else None for s in samples]
    parts = [support_part(bb, f, _model_image(bb, s) if sig_um else None, lab, i, len(feats), n_cls, cfg, balance,
                          calibrating, stats[i], sig_um)
             for i, (f, lab, s) in enumerate(zip(feats, labels, samples, strict=True))]
    fast, threshold, smoothing, sig_um, check = run(fit_head(bb, parts, n_cls, initial_head(bb, n_cls, seed=cfg.seed),
                                                             cfg, [torch.device("cpu")], balance, calibrating, sig_um,
                                                             time.time()))
    return AdaptedHead(list(classes), {k: v.detach().cpu() for k, v in fast.items()}, bb.sha256, cfg,
                       bb.mpp, {"backbone": bb.name, "cached_features": True, "calibrated_threshold": threshold,
                                "calibrated_smoothing_um": smoothing, "colour_sigmas_um": list(sig_um) or None,
                                "colour_check_miou": check})


def predict_cached(model: torch.nn.Module, feats: torch.Tensor, s: Sample, bb: Backbone, head: AdaptedHead,
                   nuclear: bool) -> Prediction:
    """``inference.predict`` with the head applied to cached features (its default ``np_source="blend"``); the class
    decision smoothed, and the nuclear-pixel map gated, over the whole image at once (``predict`` does both per
    tile: equal away from tile borders)."""
    classes, threshold, smoothing_um = head.classes, head.threshold, head.smoothing_um
    with torch.inference_mode():
        colour = head.colour_input(bb, s.image)
        tile = to_tensor_image(_model_image(bb, s)) if colour is not None else None  # only colour inputs need it
        model_probs = model.heads[TASK](head_input(feats[None], tile, colour))["seg"].softmax(1)
        probs = _resize_maps(model_probs[0].numpy(), s.shape)
        dec = _resize_maps(gaussian_smooth(model_probs, smoothing_um / bb.mpp)[0].numpy(), s.shape) \
            if smoothing_um > 0 else probs
        pred = Prediction(decide(dec, threshold), probs, list(classes))
        if nuclear:
            hov = model.heads["hover"](feats[None])
            hv = np.clip(_resize_maps(hov["hv"][0].numpy(), s.shape), -1, 1)
            hc = HoVerPostConfig()
            np_model = nuclear_pixel_map(1 - model_probs[:, :1], hov["np"], "blend", hc, bb.mpp)
            np_prob = _resize_maps(np_model[0].numpy(), s.shape)[0]
            pred.instances, pred.table = HoVerPostProcessor(hc)(  # clipped as in predict
                np.clip(np_prob, 0, 1).astype(np.float32), hv.astype(np.float32), s.mpp or bb.mpp)
    return pred


# ------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """Accumulates the metrics of ``evaluation.evaluate`` over a query set."""

    def __init__(self, kind: str, n_classes: int, nuclear: bool) -> None:
        self.kind, self.nuclear = kind, nuclear
        self.acc = ConfusionAccumulator(n_classes)
        self.inst: list[tuple[float, float]] = []
        self.det: list[dict] = []
        self.pcfg = PointsConfig()

    def add(self, q: Sample, pred: Prediction) -> None:
        from scipy import ndimage as ndi

        self.acc.update(pred.semantic, q.semantic if q.semantic is not None else np.full(q.shape, IGNORE, np.uint8))
        if q.instances is not None and self.kind != "points":
            if not self.nuclear:  # glands: the large-object instances of evaluate
                inst = object_instances(pred.semantic > 0, ObjectPostConfig(), q.mpp or 0.5)
            elif pred.instances is not None:  # HoVer instances
                inst = pred.instances
            else:  # the random forest on nuclei has no HV maps: connected components
                inst = ndi.label(pred.semantic > 0)[0].astype(np.uint32)
            self.inst.append((aji(q.instances, inst), panoptic_quality(q.instances, inst)["pq"]))
        if self.kind == "points" and q.points is not None:
            pts, _ = detect_points(pred.probs[1:].sum(0), self.pcfg)
            self.det.append(detection_scores(pts, q.points, self.pcfg.match_radius_px))

    def result(self) -> dict:
        res = {"miou": self.acc.miou(), "dice": self.acc.dice_foreground()}
        if self.inst:
            res["aji"] = float(np.mean([a for a, _ in self.inst]))
            res["pq"] = float(np.mean([p for _, p in self.inst]))
        if self.det:
            tp, fp, fn = (sum(d[k] for d in self.det) for k in ("tp", "fp", "fn"))
            p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            res.update(det_precision=p, det_recall=r, det_f1=2 * p * r / max(p + r, 1e-12))
        return res


# ------------------------------------------------------------------------------------------------ one unit


@dataclass
class Runner:
    backbones: dict[str, Backbone]  # method -> backbone (maml, transfer, scratch)
    cache: FeatureCache = field(default_factory=FeatureCache)
    rf_cache: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    rf_cfg: RFConfig = field(default_factory=RFConfig)

    def unit(self, td: TaskData, method: str, sup_ids: list[str], labels: list[np.ndarray], qry_ids: list[str],
             seed: int) -> dict:
        sups = [td.load(i) for i in sup_ids]
        qrys = [td.load(i) for i in qry_ids]
        classes = list(td.ds.class_names)
        nuclear = td.ds.kind != "points" and _is_nuclear(sups)
        scorer = Scorer(td.ds.kind, len(classes), nuclear)
        t0 = time.time()
        if method == "rf":
            preds = self._rf(td, sups, labels, qrys, seed, len(classes))
        else:
            preds = self._net(td, method, sups, labels, qrys, seed, classes, nuclear)
        t_adapt = preds.pop("adapt_seconds")
        colour = preds.pop("colour", {})
        for q in qrys:
            scorer.add(q, preds[q.sample_id])
        lab_px = sum(int((lab != IGNORE).sum()) for lab in labels)
        return {**scorer.result(), **colour, "adapt_seconds": round(t_adapt, 3),
                "seconds": round(time.time() - t0, 2),
                "labelled_fraction": lab_px / sum(s.shape[0] * s.shape[1] for s in sups)}

    def _net(self, td, method, sups, labels, qrys, seed, classes, nuclear) -> dict:
        bb = self.backbones[method]
        cfg = dataclasses.replace(SCRATCH if method == "scratch" else MAMLConfig(), seed=seed)
        t0 = time.time()
        if method in HEAD_ONLY and can_use_cache(bb, sups, labels):
            feats = [self.cache.get(bb, td.name, s) for s in sups]
            t0 = time.time()
            labs = [_model_labels(bb, s, lab) for s, lab in zip(sups, labels, strict=True)]
            head = adapt_cached(bb, feats, labs, classes, cfg, sups)
        else:
            head = run(adapt(bb, [s.image for s in sups], labels, classes, mpp=[s.mpp for s in sups], cfg=cfg))
        out: dict = {"adapt_seconds": time.time() - t0,
                     "colour": {"colour_kept": bool(head.colour_sigmas_um),
                                "colour_check": head.provenance.get("colour_check_miou")}}
        if method in HEAD_ONLY:
            model = head.module_for(bb)
            for q in qrys:
                out[q.sample_id] = predict_cached(model, self.cache.get(bb, td.name, q), q, bb, head, nuclear)
        else:
            for q in qrys:
                out[q.sample_id] = run(predict(bb, head, q.image, mpp=q.mpp, instances=nuclear))
        return out

    def _rf_feats(self, td: TaskData, s: Sample) -> np.ndarray:
        key = (td.name, s.sample_id)
        if key not in self.rf_cache:
            self.rf_cache[key] = rf_features(s.image, s.mpp, self.rf_cfg)
        return self.rf_cache[key]

    def _rf(self, td, sups, labels, qrys, seed, n_classes) -> dict:
        cfg = dataclasses.replace(self.rf_cfg, seed=seed)
        t0 = time.time()
        rf = PixelRandomForest(n_classes, cfg).fit([self._rf_feats(td, s) for s in sups], labels,
                                                  [s.mpp for s in sups])
        out: dict = {"adapt_seconds": time.time() - t0}
        for q in qrys:
            probs = rf.predict_proba(self._rf_feats(td, q), q.shape)
            out[q.sample_id] = Prediction(probs.argmax(0).astype(np.uint8), probs, [])
        return out

    def clear(self) -> None:
        self.cache.clear()
        self.rf_cache.clear()


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class Unit:
    task: str
    setting: str  # full | sparse | clicks | loto
    x: int  # K support images, or N clicked centroids
    draw: int
    method: str

    @property
    def key(self) -> tuple:
        return (self.task, self.setting, self.x, self.draw, self.method)


def plan(args, td: TaskData) -> list[Unit]:
    spec = td.spec
    ks = sorted({k for k in (args.k or spec.ks) if k <= max(spec.ks)})
    units = []
    for d in range(args.first_draw, args.draws):
        for k in ks:
            for m in args.methods:
                if m == "scratch" and (d >= args.scratch_draws or
                                       (args.scratch_k == "ends" and k not in (min(ks), max(ks)))):
                    continue
                units.append(Unit(td.name, "full", k, d, m))
        if spec.sparse and td.name in args.sparse_tasks:
            for k in [k for k in ks if k <= 2]:
                units += [Unit(td.name, "sparse", k, d, m) for m in args.methods if m != "scratch"]
        # --clicks overrides the counts of the tasks that have a clicks setting (point truth), never adds one
        for n in (args.clicks if args.clicks is not None and spec.clicks else spec.clicks):
            units += [Unit(td.name, "clicks", n, d, m) for m in args.methods if m != "scratch"]
    return units


def support_for(td: TaskData, u: Unit, max_query: int, fixed: list[str] | None) -> tuple[list, list, list, dict]:
    """Support ids, their labels, query ids and extra record fields of a unit."""
    kmax = max(td.spec.ks)
    order = td.support_order(u.draw, kmax, fixed or [])
    sup = order[: (1 if u.setting == "clicks" else u.x)]
    qry = td.query_for(sup, u.draw, max_query, fixed)
    rng = np.random.default_rng(_seed(td.name, u.draw) + [u.x, 7])
    extra: dict = {}
    if u.setting == "sparse":
        labels = [sparse_labels(td.load(i), rng) for i in sup]
    elif u.setting == "clicks":
        lab, win = click_window_labels(td.load(sup[0]), u.x, rng, PointsConfig().radius)
        labels, extra = [lab], {"window": list(win)}
    else:
        labels = [td.load(i).semantic for i in sup]
    return sup, labels, qry, extra


# ------------------------------------------------------------------------------------------------ checks


def consistency_check(runner: Runner, td: TaskData, max_query: int, fixed: list[str] | None, args) -> dict:
    """Cached path vs ``pipeline.adapt`` + ``inference.predict`` (+ ``evaluate`` on MoNuSeg) on draw 0, K=1."""
    bb = runner.backbones["maml"]
    u = Unit(td.name, "full", 1, 0, "maml")
    sup, labels, qry, _ = support_for(td, u, max_query, fixed)
    s, q = td.load(sup[0]), td.load(qry[0])
    classes = list(td.ds.class_names)
    cfg = MAMLConfig()
    ref = run(adapt(bb, [s.image], labels, classes, mpp=[s.mpp], cfg=cfg))
    mine = adapt_cached(bb, [runner.cache.get(bb, td.name, s)], [_model_labels(bb, s, labels[0])], classes, cfg, [s])
    head_diff = max(float((ref.state[k] - mine.state[k]).abs().max()) for k in ref.state)
    nuclear = td.ds.kind != "points" and _is_nuclear([s])
    p_ref = run(predict(bb, ref, q.image, mpp=q.mpp, instances=nuclear))
    p_mine = predict_cached(mine.module_for(bb), runner.cache.get(bb, td.name, q), q, bb, mine, nuclear)
    out = {"task": td.name, "support": sup, "query0": qry[0], "head_max_abs_diff": head_diff,
           "thresholds": [ref.threshold, mine.threshold], "smoothings_um": [ref.smoothing_um, mine.smoothing_um],
           "prob_max_abs_diff": float(np.abs(p_ref.probs - p_mine.probs).max()),
           "semantic_pixels_differing": float((p_ref.semantic != p_mine.semantic).mean())}
    if td.name == "monuseg" and len(qry) == len(td.ds.ids) - 1:
        ev = run(evaluate(td.ds.root, sup, method="maml", backbone=args.backbone_path, seed=0))
        ours = runner.unit(td, "maml", sup, labels, qry, 0)
        out["evaluate"] = {k: ev.get(k) for k in ("miou", "dice", "aji", "pq")}
        out["bench"] = {k: ours.get(k) for k in ("miou", "dice", "aji", "pq")}
    log.info("check %s", out)
    return out


# ------------------------------------------------------------------------------------------------ summary


METRICS = ("miou", "dice", "aji", "pq", "det_f1")


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["setting"], r["x"], r["method"]), []).append(r)
    out = []
    for (task, setting, x, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                                _method_rank(kv[0][3]))):
        row = {"task": task, "setting": setting, "x": x, "method": method, "n": len(rs),
               "adapt_seconds": float(np.median([r["adapt_seconds"] for r in rs])),
               "labelled_fraction": float(np.mean([r["labelled_fraction"] for r in rs]))}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None and r[m] == r[m]]
            if vals:
                row[m], row[m + "_std"] = float(np.mean(vals)), float(np.std(vals))
        out.append(row)
    return out


def _method_rank(m: str) -> int:
    order = ["maml", "transfer", "scratch", "rf"]
    return order.index(m) if m in order else len(order)


def _pm(row: dict, m: str) -> str:
    return f"{row[m]:.3f} ± {row[m + '_std']:.3f}" if m in row else "–"


def tables_md(summary: list[dict], header_note: str) -> str:
    parts = [header_note]
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = [r for r in summary if r["task"] == task]
        metrics = [m for m in METRICS if any(m in r for r in rows)]
        parts.append(f"\n### {task}\n")
        parts.append(common.md_table(
            ["setting", "K / clicks", "method", "draws", *metrics, "labelled %", "adapt s (median)"],
            [[r["setting"], r["x"], r["method"], r["n"], *[_pm(r, m) for m in metrics],
              f"{100 * r['labelled_fraction']:.1f}", r["adapt_seconds"]] for r in rows]))
    return "\n".join(parts)


def goals_md(summary: list[dict]) -> str:
    """The issue's targets, checked against the full-label maml rows."""
    def get(task, x, method, m, setting="full"):
        for r in summary:
            if (r["task"], r["setting"], r["x"], r["method"]) == (task, setting, x, method) and m in r:
                return r[m]
        return None

    rows = []
    for k in (1, 2):
        for m, thr in (("miou", 0.80), ("aji", 0.62), ("pq", 0.60)):
            v = get("monuseg", k, "maml", m)
            rows.append([f"MoNuSeg K={k} {m} ≥ {thr}", v, _ok(v, thr)])
    v = get("glas", 4, "maml", "miou")
    rows.append(["GlaS K=4 mIoU ≥ 0.80", v, _ok(v, 0.80)])
    v = get("bm_graz", 1, "maml", "det_f1")
    rows.append(["BM-Graz K=1 image det F1 ≥ 0.85", v, _ok(v, 0.85)])
    for r in summary:
        if r["setting"] != "full" or r["method"] != "maml" or "miou" not in r:
            continue
        others = {o: get(r["task"], r["x"], o, "miou") for o in ("transfer", "scratch", "rf")}
        others = {o: v for o, v in others.items() if v is not None}
        if others:
            best = max(others, key=others.get)
            margin = r["miou"] - others[best]
            rows.append([f"{r['task']} K={r['x']}: maml − best other ({best}) mIoU ≥ 0.05", margin,
                         _ok(margin, 0.05)])
    return common.md_table(["goal", "value", "met"], rows)


def _ok(v, thr) -> str:
    return "not measured" if v is None else ("yes" if v >= thr else "no")


def plot_task(task: str, summary: list[dict], out_name: str = "fewshot") -> Path | None:
    import matplotlib
    import matplotlib.ticker

    rows = [r for r in summary if r["task"] == task and r["setting"] in ("full", "sparse", "clicks")]
    if not rows:
        return None
    metrics = [m for m in METRICS if any(m in r for r in rows)]
    fig, axes = common.new_figure(len(metrics))
    colours = {"maml": "C0", "transfer": "C1", "scratch": "C2", "rf": "C3"}
    has_clicks = any(r["setting"] == "clicks" for r in rows)
    for ax, m in zip(axes, metrics, strict=True):
        xs: set[int] = set()
        for (setting, method) in dict.fromkeys((r["setting"], r["method"]) for r in rows):
            pts = sorted((r["x"], r[m], r[m + "_std"]) for r in rows
                         if (r["setting"], r["method"]) == (setting, method) and m in r)
            if not pts:
                continue
            x, y, e = zip(*pts, strict=True)
            colour = colours.get(method, "k")
            if has_clicks and setting == "full":  # one whole annotated image: a reference level for the clicks
                ax.axhline(y[0], color=colour, lw=1, label=f"{method} (whole image, K={x[0]})")
                continue
            xs |= set(x)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=colour,
                        linestyle={"full": "-", "sparse": "--", "clicks": ":"}[setting],
                        label=method if setting == "full" else f"{method} ({setting})")
        ax.set_xscale("log")
        ax.set_xticks(sorted(xs))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("annotated centroids in the support window" if has_clicks else "support images K")
        ax.set_title(f"{task}: {m}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return common.save_plot(fig, f"{out_name}_{task}")  # a partial run does not overwrite fewshot_<task>.png


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    p.add_argument("--k", default=None, help="comma list of support sizes (default: per task, capped by the data)")
    p.add_argument("--draws", type=int, default=3, help="random support draws per K")
    p.add_argument("--first-draw", type=int, default=0, help="skip draws below this (split a run over processes)")
    p.add_argument("--methods", default="maml,transfer,scratch,rf")
    p.add_argument("--max-query", type=int, default=None, help="cap on query images per draw (default per task)")
    p.add_argument("--backbone", default="default", help="meta-trained backbone: 'default' (bundled) or a path")
    p.add_argument("--transfer", default="transfer", help="transfer backbone: 'transfer' (bundled) or a path")
    p.add_argument("--scratch-k", choices=("ends", "all"), default="ends", help="scratch at K=min,max or every K")
    p.add_argument("--scratch-draws", type=int, default=1, help="draws that also run scratch (it trains the whole "
                   "network: ~100x the cost of the head-only methods on CPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--merge", default=None, help="comma list of result names to merge into --out (no computation); "
                   "NAME:rf+scratch takes only those methods from a part")
    p.add_argument("--sparse-tasks", default="monuseg,glas", help="tasks with the sparse-support setting ('' = none)")
    p.add_argument("--clicks", default=None, help="BM-Graz clicked-centroid counts (default 10,25,50,100)")
    p.add_argument("--quick", action="store_true", help="1 draw, K≤2, 2 queries, 25 clicks (smoke run)")
    p.add_argument("--check", action="store_true", help="compare the cached path with adapt/predict/evaluate")
    p.add_argument("--loto", action="store_true", help="only the leave-one-task-out table (runs/loto_*)")
    p.add_argument("--resume", action="store_true", help="keep finished units of an earlier run with these backbones")
    p.add_argument("--out", default="fewshot", help="results name under benchmarks/results/")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    if set(args.methods) - {"maml", "transfer", "scratch", "rf"}:
        p.error("--methods: choose from maml, transfer, scratch, rf")
    args.k = [int(k) for k in args.k.split(",")] if args.k else None
    args.sparse_tasks = [t for t in args.sparse_tasks.split(",") if t]
    args.clicks = [int(c) for c in args.clicks.split(",") if c] if args.clicks is not None else None
    if args.quick:
        args.draws, args.max_query = 1, args.max_query or 2
        args.k = args.k or [1, 2]
        args.clicks = args.clicks if args.clicks is not None else [25]
        args.sparse_tasks = args.sparse_tasks[:1]
    return args


def _load_backbones(args) -> dict[str, Backbone]:
    args.backbone_path = common.resolve_checkpoint(args.backbone, "backbone")
    args.transfer_path = common.resolve_checkpoint(args.transfer, "transfer")
    bbs = {"maml": load_backbone(args.backbone_path), "transfer": load_backbone(args.transfer_path)}
    bbs["scratch"] = common.scratch_backbone(bbs["maml"])
    return bbs


def run_units(runner: Runner, args, names: list[str], result: dict, out_name: str, done: set) -> None:
    for name in names:
        td = TaskData(name, TASKS[name])
        mq = args.max_query or td.spec.max_query
        fixed = td.fixed_query(mq) if td.spec.fixed_query else None
        if args.check:
            result["checks"].append(consistency_check(runner, td, mq, fixed, args))
        units = [u for u in plan(args, td) if u.key not in done]
        for i, u in enumerate(units):
            sup, labels, qry, extra = support_for(td, u, mq, fixed)
            t0 = time.time()
            rec = runner.unit(td, u.method, sup, labels, qry, seed=u.draw)
            rec = {**dataclasses.asdict(u), **rec, "support": sup, "query": qry, **extra}
            result["records"].append(rec)
            log.info("[%s %d/%d] %s %s x=%d draw=%d %s: mIoU %.3f %s (%.1f s)", time.strftime("%H:%M:%S"), i + 1,
                     len(units), name, u.setting, u.x, u.draw, u.method, rec["miou"],
                     " ".join(f"{m} {rec[m]:.3f}" for m in ("aji", "pq", "det_f1") if m in rec), time.time() - t0)
            common.write_json(out_name, result)
        runner.clear()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args)
    torch.manual_seed(0)
    bbs = _load_backbones(args)
    runner = Runner(bbs)
    out_name = "loto" if args.loto else args.out
    result = {**common.provenance(), "backbones": {m: {"name": b.name, "sha256": b.sha256} for m, b in bbs.items()},
              "args": {k: v for k, v in vars(args).items()}, "records": [], "checks": []}
    done: set = set()
    if args.resume and (old := common.read_json(out_name)) and old.get("backbones") == result["backbones"]:
        result["records"], result["checks"] = old["records"], old.get("checks", [])
        done = {(r["task"], r["setting"], r["x"], r["draw"], r["method"]) for r in old["records"]}
    if args.loto:
        return run_loto(args, result)
    t0 = time.time()
    run_units(runner, args, args.tasks, result, out_name, done)
    result["wall_seconds"] = round(time.time() - t0, 1)
    finish(result, args.out, args.tasks)
    return 0


def finish(result: dict, out_name: str, tasks: list[str]) -> None:
    """Summary, JSON, markdown tables and plots of a results dict."""
    result["summary"] = summarise(result["records"])
    common.write_json(out_name, result)
    bbs = result["backbones"]
    parts = result.get("parts") or [{k: result[k] for k in ("command", "commit", "machine")}]
    note = (f"Machine: {common.machine_line(parts[0]['machine'])}  \n"
            + "".join(f"Command (commit `{p['commit']}`, load average at start {p['machine']['load_avg_1_5_15']}): "
                      f"`{p['command']}`  \n" for p in parts)
            + f"Backbones: maml `{bbs['maml']['name']}` ({bbs['maml']['sha256'][:12]}), transfer "
              f"`{bbs['transfer']['name']}` ({bbs['transfer']['sha256'][:12]})  \n"
              + ("" if len(parts) > 1 else f"Wall time {result['wall_seconds'] / 60:.1f} min. ")
              + "Values: mean ± std over draws; `adapt s` is the median adaptation wall time (head-only methods: "
                "inner loop on cached features; see the protocol).")
    md = tables_md(result["summary"], note) + "\n\n### Goals (maml, full labels)\n\n" + goals_md(result["summary"])
    if result["checks"]:
        md += "\n\n### Consistency of the cached path with the GUI path\n\n" + checks_md(result["checks"])
    common.write_md(out_name, md)
    for t in tasks:
        plot_task(t, result["summary"], out_name)
    print(md)


def merge(args) -> int:
    """Combine the records of runs done separately (e.g. one process per group of tasks, or a rerun of some
    methods after a new backbone) into ``--out``. Parts may differ in backbones, but every method's records must
    come from one backbone (the random forest uses none); a unit found in several parts is taken from the last
    part listed."""
    items = [(n.split(":")[0], set(n.split(":")[1].split("+")) if ":" in n else None) for n in args.merge.split(",")]
    parts = [common.read_json(n) for n, _ in items]
    if any(p is None for p in parts):
        raise SystemExit(f"missing result file among {args.merge}")
    for p, (_, methods) in zip(parts, items, strict=True):  # "part:rf+scratch": only those methods' records
        if methods is not None:
            p["records"] = [r for r in p["records"] if r["method"] in methods]
            p["checks"] = [] if "maml" not in methods else p["checks"]
    backbones: dict[str, dict] = {}
    records: dict[tuple, dict] = {}
    for (name, _), p in zip(items, parts, strict=True):
        for m in sorted({r["method"] for r in p["records"]} & set(p["backbones"])):
            if m in backbones and backbones[m] != p["backbones"][m]:
                raise SystemExit(f"method {m!r}: {name} used backbone {p['backbones'][m]['sha256'][:12]}, an "
                                 f"earlier part {backbones[m]['sha256'][:12]}; rerun it with one backbone")
            backbones[m] = p["backbones"][m]
        records.update({(r["task"], r["setting"], r["x"], r["draw"], r["method"]): r for r in p["records"]})
    for m in ("maml", "transfer"):  # the table header names them even when a part lacks their records
        backbones.setdefault(m, next(p["backbones"][m] for p in parts if m in p["backbones"]))
    result = {**parts[0], "backbones": backbones, "records": list(records.values()),
              "checks": [c for p in parts for c in p["checks"]],
              "parts": [{k: p[k] for k in ("command", "commit", "machine")} for p in parts],
              "merged_from": args.merge.split(","), "wall_seconds": max(p.get("wall_seconds", 0) for p in parts)}
    finish(result, args.out, list(dict.fromkeys(r["task"] for r in result["records"])))
    return 0


def json_key(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True)


def checks_md(checks: list[dict]) -> str:
    rows = []
    for c in checks:
        ev = c.get("evaluate")
        th = c.get("thresholds") or [None, None]
        sm = c.get("smoothings_um") or [None, None]
        rows.append([c["task"], " / ".join("–" if t is None else f"{t:.2f}" for t in th),
                     " / ".join("–" if v is None else f"{v:g}" for v in sm),
                     c["head_max_abs_diff"], c["prob_max_abs_diff"], c["semantic_pixels_differing"],
                     "–" if not ev else " / ".join(f"{ev[k]:.4f}" for k in ("miou", "aji", "pq")),
                     "–" if not ev else " / ".join(f"{c['bench'][k]:.4f}" for k in ("miou", "aji", "pq"))])
    return common.md_table(["task", "calibrated threshold (GUI / bench)", "smoothing µm (GUI / bench)",
                            "head max abs diff", "prob max abs diff",
                            "semantic px differing",
                            "evaluate() mIoU/AJI/PQ", "bench mIoU/AJI/PQ"], rows)


# ------------------------------------------------------------------------------------------------ LOTO


def run_loto(args, result: dict) -> int:
    """Leave-one-task-out: MoNuSeg / GlaS as the new task with backbones that never saw them."""
    lines = [f"Machine: {common.machine_line(result['machine'])}  \nCommit: `{result['commit']}`  \n"
             f"Command: `{result['command']}`\n"]
    result["loto"] = {}
    for task in [t for t in LOTO_TASKS if t in args.tasks]:
        stems = {m: common.REPO / "runs" / f"loto_{task}" / s for m, s in (("maml", "last"), ("transfer", "transfer"))}
        missing = [str(p.relative_to(common.REPO)) for p in stems.values()
                   if not p.with_suffix(".safetensors").exists()]
        if missing:
            result["loto"][task] = {"status": f"not run: checkpoint(s) missing: {', '.join(missing)}"}
            lines.append(f"- **{task}**: not run — {', '.join(missing)} do(es) not exist "
                         f"(train with `configs/loto_{task}.json`).")
            continue
        bbs = {m: load_backbone(str(p)) for m, p in stems.items()}
        runner = Runner(bbs)
        methods = [m for m in args.methods if m in ("maml", "transfer", "rf")]
        sub = argparse.Namespace(**{**vars(args), "methods": methods, "sparse_tasks": [], "clicks": []})
        start = len(result["records"])
        run_units(runner, sub, [task], result, "loto", set())
        for r in result["records"][start:]:
            r["setting"] = "loto"
        result["loto"][task] = {"status": "run", "backbones": {m: b.sha256 for m, b in bbs.items()}}
    result["summary"] = summarise(result["records"])
    common.write_json("loto", result)
    md = "\n".join(lines)
    if result["summary"]:
        md += "\n" + tables_md(result["summary"], "")
        rows = []
        for task, (p_maml, p_tl) in PAPER_TABLE1.items():
            ours = {r["method"]: r["miou"] for r in result["summary"] if r["task"] == task and "miou" in r
                    and r["x"] == max(TASKS[task].ks)}
            rows.append([task, p_maml, p_tl, ours.get("maml"), ours.get("transfer")])
        md += "\n\n" + common.md_table(["new task", "paper MAML", "paper TransferL", "ours maml (K max)",
                                         "ours transfer (K max)"], rows)
    common.write_md("loto", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
