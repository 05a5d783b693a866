"""Non-deep baseline of the few-shot benchmark: an ilastik-style pixel classifier.

ilastik's (and APOC's / napari-convpaint's "classic" mode) pixel classification: a bank of Gaussian-scale
filters per pixel (intensity, edges, texture at several sigmas — here
``skimage.feature.multiscale_basic_features``) and a random forest trained on the labelled (painted) pixels.

Protocol choices (all named in :class:`RFConfig`):

* images are resampled to the same working resolution as the network (``mpp`` µm/px, the backbone's 0.5) so
  the filter sigmas mean the same physical size on every data set; the class probabilities are resized back
  to the image bilinearly before the arg-max (as the network's maps are);
* at most ``max_pixels`` labelled support pixels train the forest: a uniform sample of the painted pixels (the
  classes in the proportions they were painted, as in ilastik), topped up so no painted class has fewer than
  ``min_class_share`` of them (balanced sampling shifts the forest's prior and floods the query with false
  foreground);
* IGNORE (255) pixels are unknown and never used;
* the forest has no instance branch: instances are connected components of the predicted foreground.

Requires scikit-learn (bench-only dependency: ``pip install -e ".[bench]"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_metahistoseg.data.task import IGNORE


@dataclass(frozen=True)
class RFConfig:
    """Random-forest pixel classifier settings (defaults follow ilastik's: 100 trees, sigmas 1..16 px)."""

    n_estimators: int = 100
    max_pixels: int = 20_000  # labelled support pixels used for training (uniform sample of the painted pixels)
    min_class_share: float = 0.05  # ... topped up so every painted class has at least this share of them
    sigma_min: float = 1.0  # px at the working resolution
    sigma_max: float = 16.0
    mpp: float = 0.5  # working resolution in µm/px (images with unknown mpp are used as they are)
    n_jobs: int = 2
    seed: int = 0


def _rescale(a: np.ndarray, factor: float, order: int) -> np.ndarray:
    from napari_metahistoseg.pipeline import rescale

    return rescale(a, factor, order=order)


def rf_features(image: np.ndarray, mpp: float | None, cfg: RFConfig) -> np.ndarray:
    """``(h, w, F) float32`` filter responses of ``image (H, W, 3) uint8`` at the working resolution."""
    from skimage.feature import multiscale_basic_features

    small = _rescale(image, (mpp or cfg.mpp) / cfg.mpp, order=1)
    return multiscale_basic_features(small.astype(np.float32) / 255.0, channel_axis=-1, intensity=True,
                                     edges=True, texture=True, sigma_min=cfg.sigma_min,
                                     sigma_max=cfg.sigma_max).astype(np.float32)


def _labels_at(labels: np.ndarray, mpp: float | None, cfg: RFConfig, shape: tuple[int, int]) -> np.ndarray:
    lab = _rescale(labels.astype(np.uint8), (mpp or cfg.mpp) / cfg.mpp, order=0)
    if lab.shape != shape:  # rounding of the two resizes can differ by a pixel
        out = np.full(shape, IGNORE, np.uint8)
        h, w = min(shape[0], lab.shape[0]), min(shape[1], lab.shape[1])
        out[:h, :w] = lab[:h, :w]
        lab = out
    return lab


def sample_pixels(labels: list[np.ndarray], max_pixels: int, min_class_share: float, seed: int) -> list[np.ndarray]:
    """Flat indices of the labelled pixels used per image: a uniform sample of ``max_pixels`` labelled pixels (so
    the forest sees the classes in the proportions they were painted, as ilastik does), topped up so that every
    painted class has at least ``min_class_share * max_pixels`` pixels (or all of its pixels)."""
    rng = np.random.default_rng(seed)
    flat = [lab.ravel() for lab in labels]
    owner = np.concatenate([np.full(f.size, k) for k, f in enumerate(flat)])
    offset = np.concatenate([np.arange(f.size) for f in flat])
    allv = np.concatenate(flat)
    lab_idx = np.flatnonzero(allv != IGNORE)
    if not lab_idx.size:
        raise ValueError("the support has no labelled pixels")
    sel = rng.choice(lab_idx, min(max_pixels, lab_idx.size), replace=False)
    floor = int(min_class_share * max_pixels)
    extra = []
    for c in np.unique(allv[lab_idx]):
        have = int((allv[sel] == c).sum())
        if have < floor:
            cand = np.setdiff1d(lab_idx[allv[lab_idx] == c], sel)
            extra.append(rng.choice(cand, min(floor - have, cand.size), replace=False))
    sel = np.concatenate([sel, *extra])
    return [np.sort(offset[sel[owner[sel] == k]]) for k in range(len(flat))]


class PixelRandomForest:
    """Fit on support images + sparse labels, predict class probabilities of query images."""

    def __init__(self, n_classes: int, cfg: RFConfig | None = None) -> None:
        self.n_classes = n_classes
        self.cfg = cfg or RFConfig()
        self.forest = None

    def fit(self, feats: list[np.ndarray], labels: list[np.ndarray], mpps: list[float | None]) -> PixelRandomForest:
        """``feats`` from :func:`rf_features`; ``labels (H, W) uint8`` at the images' own resolution."""
        from sklearn.ensemble import RandomForestClassifier

        labs = [_labels_at(lab, m, self.cfg, f.shape[:2]) for f, lab, m in zip(feats, labels, mpps, strict=True)]
        idx = sample_pixels(labs, self.cfg.max_pixels, self.cfg.min_class_share, self.cfg.seed)
        x = np.concatenate([f.reshape(-1, f.shape[-1])[i] for f, i in zip(feats, idx, strict=True)])
        y = np.concatenate([lab.ravel()[i] for lab, i in zip(labs, idx, strict=True)]).astype(np.int64)
        self.forest = RandomForestClassifier(n_estimators=self.cfg.n_estimators, n_jobs=self.cfg.n_jobs,
                                             random_state=self.cfg.seed).fit(x, y)
        return self

    def predict_proba(self, feats: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """``(C, H, W) float32`` class probabilities resized to the image ``shape``."""
        import torch

        if self.forest is None:
            raise ValueError("PixelRandomForest.predict_proba called before fit")
        h, w, nf = feats.shape
        p = self.forest.predict_proba(feats.reshape(-1, nf)).astype(np.float32)
        probs = np.zeros((self.n_classes, h * w), np.float32)
        probs[self.forest.classes_.astype(int)] = p.T
        probs = probs.reshape(self.n_classes, h, w)
        if (h, w) != tuple(shape):
            t = torch.from_numpy(probs)[None]
            probs = torch.nn.functional.interpolate(t, size=tuple(shape), mode="bilinear",
                                                    align_corners=False)[0].numpy()
        return probs
