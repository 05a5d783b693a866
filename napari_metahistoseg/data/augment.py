"""Augmentation as in MetaHistoSeg, applied consistently to image, semantic mask, instances and points.

One random affine (rescale ×[scale_min, scale_max], rotation ±rotate_deg, flips) maps the crop back into the
source image; images are resampled bilinearly (reflected at the border), labels with nearest neighbour, and
label pixels that come from outside the source image are :data:`IGNORE` (never background). Colour jitter
(brightness, contrast, saturation, hue) acts on the image only. Everything is driven by a
``numpy.random.Generator`` so results are reproducible for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from ..config import AugmentConfig
from .task import IGNORE, Sample


@dataclass
class Crop:
    """An augmented crop: ``image (S,S,3) uint8``, ``semantic (S,S) uint8``, ``instances (S,S) uint32``,
    ``points (N,2)`` (row, col) inside the crop with ``point_classes``."""

    image: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray | None
    points: np.ndarray | None
    point_classes: np.ndarray | None


def _affine(rng: np.random.Generator, cfg: AugmentConfig, crop: int, centre: np.ndarray, train: bool):
    """Matrix ``A`` and offset ``b`` with ``source = A @ crop_coord + b`` ((row, col) coordinates)."""
    if train:
        s = rng.uniform(cfg.scale_min, cfg.scale_max)
        th = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
        fr = -1.0 if rng.random() < cfg.flip_p else 1.0
        fc = -1.0 if rng.random() < cfg.flip_p else 1.0
    else:
        s, th, fr, fc = 1.0, 0.0, 1.0, 1.0
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    a = rot @ np.diag([fr / s, fc / s])
    half = (crop - 1) / 2.0
    b = centre - a @ np.array([half, half])
    return a, b


def _warp_labels(lab: np.ndarray, a: np.ndarray, b: np.ndarray, out: tuple[int, int], fill: int) -> np.ndarray:
    return ndi.affine_transform(lab, a, offset=b, output_shape=out, order=0, mode="constant", cval=fill,
                                prefilter=False)


def colour_jitter(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Random brightness/contrast/saturation/hue jitter of an ``(H,W,3) uint8`` image (torchvision semantics)."""
    from skimage.color import hsv2rgb, rgb2hsv

    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    x = (x - grey.mean()) * c + grey.mean()
    sat = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    grey = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = np.clip((x - grey) * sat + grey, 0, 1)
    if cfg.hue > 0:
        hsv = rgb2hsv(x)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue)) % 1.0
        x = hsv2rgb(hsv)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def augment_crop(
    sample: Sample,
    rng: np.random.Generator,
    cfg: AugmentConfig,
    *,
    train: bool = True,
    centre: tuple[float, float] | None = None,
) -> Crop:
    """Draw one ``cfg.crop_px`` square crop of ``sample`` with the paper's augmentation (``train=False``: a
    plain crop at ``centre``, or the image centre). Images smaller than the crop are padded: label pixels
    outside the image are IGNORE."""
    h, w = sample.shape
    s = cfg.crop_px
    if centre is None:
        centre = (rng.uniform(0, h - 1), rng.uniform(0, w - 1)) if train else ((h - 1) / 2, (w - 1) / 2)
    a, b = _affine(rng, cfg, s, np.asarray(centre, np.float64), train)
    out = (s, s)
    img = np.stack(
        [ndi.affine_transform(sample.image[..., k], a, offset=b, output_shape=out, order=1, mode="reflect",
                              prefilter=False) for k in range(3)], axis=-1)
    sem_src = sample.semantic if sample.semantic is not None else np.full((h, w), IGNORE, np.uint8)
    sem = _warp_labels(sem_src, a, b, out, IGNORE)
    inst = None
    if sample.instances is not None:
        inst = _warp_labels(sample.instances, a, b, out, 0).astype(np.uint32)
    pts = pcls = None
    if sample.points is not None:
        local = (np.linalg.inv(a) @ (sample.points - b).T).T
        keep = np.all((local >= 0) & (local <= s - 1), axis=1)
        pts = local[keep]
        pcls = None if sample.point_classes is None else sample.point_classes[keep]
    if train:
        img = colour_jitter(img, rng, cfg)
    return Crop(img, sem, inst, pts, pcls)
