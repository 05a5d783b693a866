"""Training the bundled "is this a mitotic figure?" classifier, with a held-apart source check.

Positives are the AMi-Br mitotic figures (normal and atypical; MIDOG21 and TUPAC16). Negatives are nucleus-centred
patches of other development sets (MoNuSeg, CPM-15, CoNSeP tiles) at the same physical scale, **assuming they
contain essentially no mitoses** (their annotations have no mitosis class; a rare unlabelled mitosis would be a
noisy negative). Positives and negatives therefore come from different labs and scanners, and a classifier can
learn the source instead of the figure. :func:`run_recipe` checks this: it first trains with one negative source
(``holdout_negatives``) and one positive sub-source (``holdout_positive_dataset``) held apart and reports
accuracy on them, next to a colour-statistics baseline (a logistic regression on the patches' mean and std per
RGB channel: how far colour alone separates the classes), then trains the final model on all sources.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import MitosisConfig, to_dict
from .data import open_dataset
from .maml import relay
from .metrics import classification_scores
from .mitosis import MitosisNet, classify, extract_patches, flip_patches, rotate_patches, rotations_for, stain_jitter


@dataclass(frozen=True)
class MitosisTrainConfig:
    """The recipe of the bundled mitosis classifier (saved in its JSON)."""

    mitosis: MitosisConfig = field(default_factory=MitosisConfig)
    positives: str = "amibr_mitosis"  # folder name under the data root
    negatives: tuple[str, ...] = ("monuseg", "cpm15", "consep_tiles")
    holdout_negatives: str = "consep_tiles"  # negative source never seen by the check run
    holdout_positive_dataset: str = "TUPAC16"  # AMi-Br 'dataset' never seen by the check run
    val_fraction: float = 0.2  # share of slides/images per seen source kept for the in-source validation
    max_negatives_per_source: int = 1500  # nucleus centroids sampled per negative source (spread over its images)
    min_nucleus_area_um2: float = 8.0  # smaller instances (fragments cut at tile borders) are not candidates
    steps: int = 600  # optimiser steps
    batch_size: int = 32  # half positives, half negatives
    lr: float = 3e-3  # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    stain_scale_sigma: float = 0.25  # HED jitter: concentration scale ~ U(1 - s, 1 + s) per patch and stain
    stain_bias_od: float = 0.05  # HED jitter: concentration shift ~ U(-b, b) (optical density units)
    probe_max_per_class: int = 300  # backbone-probe check: patches per class and set (the U-Net is slow on CPU)
    seed: int = 0
    threads: int = 1  # torch intra-op threads

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"MitosisTrainConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("max_negatives_per_source", "steps", "batch_size", "lr", "threads"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MitosisTrainConfig.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class PatchSet:
    """Patches with labels and provenance: ``x (N, P, P, 3) uint8``, ``y (N,) int64`` (1 = mitotic),
    ``source`` (N,) e.g. "MIDOG21" / "monuseg", ``group`` (N,) slide or image id (for group-disjoint splits)."""

    x: np.ndarray
    y: np.ndarray
    source: np.ndarray
    group: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, mask: np.ndarray) -> PatchSet:
        return PatchSet(self.x[mask], self.y[mask], self.source[mask], self.group[mask])

    @staticmethod
    def concat(sets: list[PatchSet]) -> PatchSet:
        return PatchSet(*(np.concatenate([getattr(s, k) for s in sets]) for k in ("x", "y", "source", "group")))


def nucleus_centroids(instances: np.ndarray, mpp: float, min_area_um2: float) -> np.ndarray:
    """``(N, 2)`` (row, col) centroids of the instances of an ``(H, W)`` instance map at least ``min_area_um2``."""
    lab = np.asarray(instances).ravel().astype(np.int64)
    rows, cols = np.indices(np.asarray(instances).shape)
    area = np.bincount(lab)
    r = np.bincount(lab, rows.ravel()) / np.maximum(area, 1)
    c = np.bincount(lab, cols.ravel()) / np.maximum(area, 1)
    keep = area * mpp**2 >= min_area_um2
    keep[0] = False
    return np.stack([r[keep], c[keep]], 1)


def load_positives(root: Path, cfg: MitosisConfig) -> PatchSet:
    """AMi-Br patches (centred mitotic figures) cut to ``cfg.patch_um`` and resized; source = MIDOG21/TUPAC16."""
    ds = open_dataset(root)
    xs, src, grp = [], [], []
    for s in ds:
        h, w = s.shape
        p, _ = extract_patches(s.image, np.array([[h / 2, w / 2]]), s.mpp or ds.mpp, cfg)
        xs.append(p[0])
        src.append(s.meta["dataset"])
        grp.append(f"{s.meta['dataset']}:{s.meta['slide']}")
    n = len(xs)
    return PatchSet(np.stack(xs), np.ones(n, np.int64), np.array(src), np.array(grp))


def load_negatives(root: Path, name: str, tcfg: MitosisTrainConfig, rng: np.random.Generator) -> PatchSet:
    """Nucleus-centred patches at ``max_negatives_per_source`` sampled centroids, spread evenly over the images.

    Only windows that lie wholly inside their image are used (on 64 µm CoNSeP tiles most windows would be
    mirror-padded, and padding must not become a cue for "negative"); the positives are never padded."""
    ds = open_dataset(root)
    per_image = math.ceil(tcfg.max_negatives_per_source / len(ds))
    xs, grp = [], []
    for s in ds:
        if s.instances is None:
            raise ValueError(f"{root}: sample {s.sample_id} has no instance map (needed for nucleus centroids)")
        mpp = s.mpp or ds.mpp
        pts = nucleus_centroids(s.instances, mpp, tcfg.min_nucleus_area_um2)
        patches, padded = extract_patches(s.image, pts, mpp, tcfg.mitosis)
        keep = rng.permutation(np.flatnonzero(~padded))[:per_image]
        if len(keep):
            xs.append(patches[keep])
            grp += [f"{name}:{s.sample_id}"] * len(keep)
    x = np.concatenate(xs)
    n = len(x)
    return PatchSet(x, np.zeros(n, np.int64), np.array([name] * n), np.array(grp))


def group_split(ps: PatchSet, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``(N,) bool`` validation mask: ``fraction`` of the groups of every source (at least one when > 0)."""
    val = np.zeros(len(ps), bool)
    for src in np.unique(ps.source):
        groups = np.unique(ps.group[ps.source == src])
        n = max(1, round(fraction * len(groups))) if fraction > 0 else 0
        val |= np.isin(ps.group, rng.permutation(groups)[:n])
    return val


def _rotated(ps: PatchSet, cfg: MitosisConfig) -> tuple[np.ndarray, np.ndarray]:
    """The study's rotation copies: label-1 patches at 0/45/90°, label-0 at 0/45°."""
    xs, ys = [], []
    for label in (0, 1):
        sel = ps.x[ps.y == label]
        for deg in rotations_for(label, cfg):
            xs.append(rotate_patches(sel, deg))
            ys.append(np.full(len(sel), label, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def train_classifier(train: PatchSet, tcfg: MitosisTrainConfig, *,
                     device: str = "cpu") -> Generator[dict, None, MitosisNet]:
    """Train a :class:`MitosisNet` on ``train`` (balanced batches, rotations, flips, HED jitter); yields
    ``{"step", "steps", "loss"}``, returns the model (eval mode, CPU)."""
    if len(np.unique(train.y)) < 2:
        raise ValueError("training set needs both positive and negative patches")
    torch.manual_seed(tcfg.seed)
    rng = np.random.default_rng(tcfg.seed)
    x, y = _rotated(train, tcfg.mitosis)
    idx = [np.flatnonzero(y == k) for k in (0, 1)]
    model = MitosisNet(tcfg.mitosis).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, tcfg.steps)
    half = tcfg.batch_size // 2
    for step in range(tcfg.steps):
        b = np.concatenate([rng.choice(idx[0], tcfg.batch_size - half), rng.choice(idx[1], half)])
        xb = x[b]
        fr, fc = rng.random(len(b)) < 0.5, rng.random(len(b)) < 0.5
        xb = np.where(fr[:, None, None, None], flip_patches(xb, True, False), xb)
        xb = np.where(fc[:, None, None, None], flip_patches(xb, False, True), xb)
        xb = stain_jitter(xb, rng, tcfg.stain_scale_sigma, tcfg.stain_bias_od)
        xt = torch.from_numpy(xb).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        loss = F.cross_entropy(model(xt), torch.from_numpy(y[b]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        yield {"step": step + 1, "steps": tcfg.steps, "loss": float(loss.detach())}
    return model.cpu().eval()


def _colour_features(x: np.ndarray) -> np.ndarray:
    f = x.reshape(len(x), -1, 3).astype(np.float64) / 255.0
    return np.concatenate([f.mean(1), f.std(1)], 1)


def fit_logistic(f: np.ndarray, y: np.ndarray, seed: int):
    """Class-balanced logistic regression (LBFGS) on standardised features; returns ``predict(f) -> (N,) int``."""
    mu, sd = f.mean(0), f.std(0) + 1e-8
    torch.manual_seed(seed)
    lin = torch.nn.Linear(f.shape[1], 2).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)
    xt, yt = torch.from_numpy((f - mu) / sd), torch.from_numpy(y)
    w = (len(yt) / (2 * torch.bincount(yt, minlength=2))).double()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), yt, weight=w)
        loss.backward()
        return loss

    opt.step(closure)
    return lambda g: lin(torch.from_numpy((g - mu) / sd)).argmax(1).detach().numpy()


def colour_baseline(train: PatchSet, seed: int):
    """A logistic regression on per-channel mean/std (6 numbers per patch): what colour alone can separate.
    Returns a ``predict(PatchSet) -> (N,) int`` callable."""
    fit = fit_logistic(_colour_features(train.x), train.y, seed)
    return lambda ps: fit(_colour_features(ps.x))


def backbone_features(backbone: Path, x: np.ndarray) -> np.ndarray:
    """Frozen U-Net decoder features of a MetaHistoSeg checkpoint, mean-pooled over the whole patch and over its
    central half: ``(N, 2 * C) float64`` (the "reuse the backbone's features" alternative to the small CNN)."""
    from .checkpoints import load_model
    from .mitosis import to_tensor

    net = load_model(backbone)[0].eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(x), 64):
            f = net.features(to_tensor(x[i:i + 64]))
            q = f.shape[-1] // 4
            out.append(torch.cat([f.mean((2, 3)), f[..., q:-q, q:-q].mean((2, 3))], 1).double().numpy())
    return np.concatenate(out)


def score(pred: np.ndarray, ps: PatchSet) -> dict:
    """Balanced accuracy, recall (mitoses found) and specificity (nuclei rejected) of 0/1 predictions."""
    out = {"n_pos": int((ps.y == 1).sum()), "n_neg": int((ps.y == 0).sum())}
    pos, neg = ps.y == 1, ps.y == 0
    out["recall"] = float((pred[pos] == 1).mean()) if pos.any() else None
    out["specificity"] = float((pred[neg] == 0).mean()) if neg.any() else None
    if pos.any() and neg.any():
        s = classification_scores(ps.y, pred.astype(np.int64))
        out.update(balanced_accuracy=s["balanced_accuracy"], f1=s["f1"])
    return out


def _subsample(ps: PatchSet, per_class: int, rng: np.random.Generator) -> PatchSet:
    keep = np.concatenate([rng.permutation(np.flatnonzero(ps.y == k))[:per_class] for k in (0, 1)])
    return ps.take(np.sort(keep))


def held_apart_sets(val: PatchSet, held_pos: PatchSet, held_neg: PatchSet) -> dict[str, PatchSet]:
    """The evaluation sets of the source check."""
    vp, vn = val.take(val.y == 1), val.take(val.y == 0)
    return {"in_source_val": val, "held_pos+held_neg": PatchSet.concat([held_pos, held_neg]),
            "held_pos+seen_neg": PatchSet.concat([held_pos, vn]), "seen_pos+held_neg": PatchSet.concat([vp, held_neg])}


def _tagged(gen: Generator[dict, None, MitosisNet], phase: str) -> Generator[dict, None, MitosisNet]:
    """Forward ``gen``'s progress with a ``"phase"`` key and return its return value."""
    return (yield from relay(gen, lambda e: {"phase": phase, **e}))


def run_recipe(data_root: Path, tcfg: MitosisTrainConfig, *, check: bool = True, final: bool = True,
               backbone: Path | None = None,
               device: str = "cpu") -> Generator[dict, None, tuple[MitosisNet | None, dict]]:
    """Load the data, run the held-apart source check (if ``check``), train the final model on all sources (if
    ``final``); with ``backbone`` (a MetaHistoSeg checkpoint) the check also scores a linear probe on its frozen
    features. Yields progress dicts (``{"phase", "step", "steps", "loss"}``); returns ``(model, report)``."""
    torch.set_num_threads(tcfg.threads)
    rng = np.random.default_rng(tcfg.seed)
    t0 = time.perf_counter()
    pos = load_positives(data_root / tcfg.positives, tcfg.mitosis)
    negs = {n: load_negatives(data_root / n, n, tcfg, rng) for n in tcfg.negatives}
    report: dict = {"recipe": to_dict(tcfg), "data": {"positives": {s: int((pos.source == s).sum())
                                                                   for s in np.unique(pos.source)},
                                                     "negatives": {n: len(v) for n, v in negs.items()}},
                    "load_s": round(time.perf_counter() - t0, 1)}
    if check:
        held_pos = pos.take(pos.source == tcfg.holdout_positive_dataset)
        held_neg = negs[tcfg.holdout_negatives]
        seen = PatchSet.concat([pos.take(pos.source != tcfg.holdout_positive_dataset)]
                               + [v for n, v in negs.items() if n != tcfg.holdout_negatives])
        is_val = group_split(seen, tcfg.val_fraction, rng)
        t1 = time.perf_counter()
        gen = train_classifier(seen.take(~is_val), tcfg, device=device)
        model = yield from _tagged(gen, "check")
        colour = colour_baseline(seen.take(~is_val), tcfg.seed)
        sets = held_apart_sets(seen.take(is_val), held_pos, held_neg)
        report["check"] = {
            "train": {"positives": sorted(set(seen.source[(~is_val) & (seen.y == 1)])),
                      "negatives": sorted(set(seen.source[(~is_val) & (seen.y == 0)])), "n": int((~is_val).sum())},
            "held_apart": {"positives": tcfg.holdout_positive_dataset, "negatives": tcfg.holdout_negatives},
            "cnn": {k: score((classify(model, v.x) >= tcfg.mitosis.threshold).astype(int), v) for k, v in sets.items()},
            "colour_baseline": {k: score(colour(v), v) for k, v in sets.items()},
            "train_s": round(time.perf_counter() - t1, 1)}
        if backbone is not None:
            sub = {k: _subsample(v, tcfg.probe_max_per_class, rng) for k, v in
                   {"train": seen.take(~is_val), **sets}.items()}
            probe = fit_logistic(backbone_features(backbone, sub["train"].x), sub["train"].y, tcfg.seed)
            report["check"]["backbone_probe"] = {"checkpoint": str(backbone), **{
                k: score(probe(backbone_features(backbone, v.x)), v) for k, v in sub.items() if k != "train"}}
            report["check"]["cnn_on_probe_subsets"] = {
                k: score((classify(model, v.x) >= tcfg.mitosis.threshold).astype(int), v)
                for k, v in sub.items() if k != "train"}
    if not final:
        return None, report
    t2 = time.perf_counter()
    gen = train_classifier(PatchSet.concat([pos, *negs.values()]), tcfg, device=device)
    model = yield from _tagged(gen, "final")
    report["final_train_s"] = round(time.perf_counter() - t2, 1)
    return model, report
