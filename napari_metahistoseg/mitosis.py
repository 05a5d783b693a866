"""Mitosis by patch classification: candidate patches, a small GroupNorm CNN, few-shot adaptation.

As in the mitosis patch-classification study (``docs/SEEDS.md``): square patches around candidate nuclei are
classified by a CNN with 2 outputs; positives are augmented by rotations of 0/45/90°, negatives by 0/45°.

* :func:`extract_patches`   ``image (H, W, 3) uint8`` + ``points (N, 2)`` (row, col) + mpp →
  ``(N, P, P, 3) uint8`` patches of ``cfg.patch_um`` µm resized to ``cfg.patch_px``, and ``(N,) bool`` padded
* :func:`rotations_for`, :func:`rotate_patches`, :func:`flip_patches`, :func:`stain_jitter` — augmentation
* :class:`MitosisNet`       ``(B, 3, P, P) float32`` in [0, 1] → ``(B, n_classes)`` raw logits
* :func:`classify`          patches → ``(N,) float32`` probability of class 1 (mitotic; atypical after adaptation)
* :func:`adapt_classifier`  generator: few-shot adaptation of the head (and optionally the last conv stages)
* :func:`adapt_from_points` generator: an image's clicked examples (1 = mitotic, 0 = not) → adapted classifier
* :func:`save_mitosis_model` / :func:`load_mitosis_model` — safetensors + JSON, strict, never pickle.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Generator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import nn

from .checkpoints import _atomic_save_tensors, _atomic_write_json, _load_tensors, file_sha256, git_commit, stem_paths
from .config import MitosisConfig, from_dict, to_dict
from .devices import get_device, resolve_devices
from .maml import relay
from .models import group_norm

MITOSIS_FORMAT = "metahistoseg-mitosis"
FORMAT_VERSION = 1
MITOSIS_CLASSES = ("non-mitotic", "mitotic")
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "mitosis.safetensors"

_CONSTANT_PAD = 255  # pad value of pad_mode="constant": white (empty glass), not black (which looks like chromatin)
_NORM_STD_FLOOR = 0.02  # per-patch std floor (intensity units of [0, 1]) so flat patches are not blown up
_FIXED_MEAN, _FIXED_STD = 0.5, 0.25  # normalise="fixed": (x - 0.5) / 0.25 on [0, 1] RGB
_OD_FLOOR = 1.0 / 255.0  # smallest transmitted intensity before taking the optical density
_CHUNK = 512  # patches per resize / inference chunk


# ------------------------------------------------------------------------------------------ candidate patches


def _check_patches(patches: np.ndarray, name: str = "patches") -> np.ndarray:
    p = np.asarray(patches)
    if p.ndim != 4 or p.shape[3] != 3 or p.dtype != np.uint8 or p.shape[1] != p.shape[2] or p.shape[1] == 0:
        raise ValueError(f"{name} must be (N, P, P, 3) uint8, got {p.shape} {p.dtype}")
    return p


def patch_side_px(mpp: float, cfg: MitosisConfig) -> int:
    """Side in image pixels of a ``cfg.patch_um`` µm patch at ``mpp`` µm/pixel (rounded, at least 1)."""
    if not isinstance(mpp, (int, float, np.floating)) or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (µm per pixel) must be a finite number > 0, got {mpp!r}")
    return max(1, int(round(cfg.patch_um / float(mpp))))


def _resize(crops: np.ndarray, size: int) -> np.ndarray:
    """``(N, S, S, 3) uint8`` → ``(N, size, size, 3) uint8`` (bilinear, antialiased when shrinking)."""
    if crops.shape[1] == size or len(crops) == 0:
        return crops.reshape(len(crops), size, size, 3) if len(crops) == 0 else crops
    out = []
    for i in range(0, len(crops), _CHUNK):
        t = torch.from_numpy(crops[i:i + _CHUNK]).permute(0, 3, 1, 2).float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=size < crops.shape[1])
        out.append(t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def extract_patches(image: np.ndarray, points: np.ndarray, mpp: float,
                    cfg: MitosisConfig) -> tuple[np.ndarray, np.ndarray]:
    """Square patches of ``cfg.patch_um`` µm centred on ``points``, resized to ``cfg.patch_px``.

    Args:
        image: ``(H, W, 3) uint8`` RGB.
        points: ``(N, 2)`` (row, col) pixel coordinates inside the image (e.g. nucleus centroids).
        mpp: µm per pixel of ``image``; the patch side in pixels is ``round(patch_um / mpp)``.
        cfg: patch size, output size and ``pad_mode``.

    Returns:
        ``patches (N, P, P, 3) uint8`` and ``padded (N,) bool``: True where the window crossed the image border
        and was completed with ``cfg.pad_mode`` (no candidate is ever dropped). The window of side S covers
        pixel rows ``round(row - S/2) .. + S - 1``, so an integer point is at pixel ``S // 2`` of the window.
    """
    im = np.asarray(image)
    if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8 or 0 in im.shape:
        raise ValueError(f"image must be a non-empty (H, W, 3) uint8 array, got {im.shape} {im.dtype}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.size == 0:
        pts = pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise ValueError(f"points must be a finite (N, 2) array of (row, col), got shape {pts.shape}")
    h, w = im.shape[:2]
    outside = points_outside(pts, (h, w))
    if outside.size:
        raise ValueError(f"{outside.size} point(s) lie outside the {h}x{w} image, e.g. index {outside[0]} at "
                         f"{pts[outside[0]].tolist()}")
    s = patch_side_px(mpp, cfg)
    starts = np.floor(pts - s / 2 + 0.5).astype(np.int64)
    crops = np.empty((len(pts), s, s, 3), np.uint8)
    padded = np.zeros(len(pts), bool)
    for i, (r0, c0) in enumerate(starts):
        a0, a1, b0, b1 = max(r0, 0), min(r0 + s, h), max(c0, 0), min(c0 + s, w)
        crop = im[a0:a1, b0:b1]
        pad = ((a0 - r0, r0 + s - a1), (b0 - c0, c0 + s - b1), (0, 0))
        if any(p for ax in pad for p in ax):
            padded[i] = True
            mode = cfg.pad_mode if cfg.pad_mode != "reflect" or min(crop.shape[:2]) > 1 else "edge"
            kw = {"constant_values": _CONSTANT_PAD} if mode == "constant" else {}
            crop = np.pad(crop, pad, mode=mode, **kw)
        crops[i] = crop
    return _resize(crops, cfg.patch_px), padded


def points_outside(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Indices of the ``points (N, 2)`` (row, col) outside an image of ``shape`` (H, W): pixel centres are at integer
    coordinates, so the image spans -0.5 .. H - 0.5 (rows) and -0.5 .. W - 0.5 (columns)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = shape
    return np.flatnonzero((pts[:, 0] < -0.5) | (pts[:, 0] > h - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > w - 0.5))


def classify_points_blockwise(model: MitosisNet, read, shape: tuple[int, int], points: np.ndarray, mpp: float, *,
                              block_px: int = 2048, device: torch.device | str = "cpu") -> np.ndarray:
    """Probability per candidate ``points (N, 2)`` (row, col) of an image read region by region: ``read((r0, c0,
    r1, c1))`` → RGB array. Candidates are grouped by ``block_px`` blocks and each block is read once with a patch of
    margin, so a slide is never in memory."""
    cfg = model.cfg
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    side = patch_side_px(mpp, cfg) + 2
    probs = np.zeros(len(pts), np.float32)
    keys = np.floor(pts / block_px).astype(np.int64) if len(pts) else np.zeros((0, 2), np.int64)
    for key in sorted({tuple(k) for k in keys.tolist()}):
        sel = np.flatnonzero((keys == key).all(1))
        r0, c0 = max(0, key[0] * block_px - side), max(0, key[1] * block_px - side)
        r1, c1 = min(shape[0], (key[0] + 1) * block_px + side), min(shape[1], (key[1] + 1) * block_px + side)
        crop = np.asarray(read((r0, c0, r1, c1)))
        patches, _ = extract_patches(crop, pts[sel] - [r0, c0], mpp, cfg)
        probs[sel] = classify(model, patches, device=device)
    return probs


def points_from_table(table: dict) -> np.ndarray:
    """``(N, 2) float64`` (row, col) candidate points from a :class:`~.postprocess.HoVerPostProcessor` table."""
    try:
        return np.stack([np.asarray(table["centroid_row"], float), np.asarray(table["centroid_col"], float)], 1)
    except KeyError as e:
        raise ValueError(f"instance table lacks column {e}; expected 'centroid_row' and 'centroid_col'") from None


# ------------------------------------------------------------------------------------------ augmentation


def rotations_for(label: int, cfg: MitosisConfig) -> tuple[float, ...]:
    """Rotation angles (degrees) of the augmentation copies: positives (label 1) 0/45/90°, negatives 0/45°."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 (negative) or 1 (positive), got {label!r}")
    return cfg.positive_rotations_deg if label == 1 else cfg.negative_rotations_deg


def rotate_patches(patches: np.ndarray, deg: float) -> np.ndarray:
    """Rotate ``(N, P, P, 3) uint8`` patches counter-clockwise about their centre; multiples of 90° are exact,
    other angles bilinear with the corners filled by reflection."""
    p = _check_patches(patches)
    if float(deg) % 90 == 0:
        return np.ascontiguousarray(np.rot90(p, k=int(deg // 90) % 4, axes=(1, 2)))
    a = math.radians(deg)
    theta = torch.tensor([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0]], dtype=torch.float32)
    t = torch.from_numpy(p).permute(0, 3, 1, 2).float()
    grid = F.affine_grid(theta.expand(len(p), 2, 3), list(t.shape), align_corners=False)
    t = F.grid_sample(t, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def flip_patches(patches: np.ndarray, rows: bool, cols: bool) -> np.ndarray:
    """Flip ``(N, P, P, 3)`` patches upside-down (``rows``) and/or left-right (``cols``)."""
    p = _check_patches(patches)
    return np.ascontiguousarray(p[:, ::-1 if rows else 1, ::-1 if cols else 1])


def stain_jitter(patches: np.ndarray, rng: np.random.Generator, scale_sigma: float, bias_od: float) -> np.ndarray:
    """HED-space stain augmentation (Tellez et al. 2018): per patch and stain, concentration ``c * a + b`` with
    ``a ~ U(1 - scale_sigma, 1 + scale_sigma)`` and ``b ~ U(-bias_od, bias_od)`` (optical density units).

    Uses skimage's Ruifrok-Johnston H/E/DAB matrices but keeps negative concentrations, so the round trip is
    exact without jitter. ``(N, P, P, 3) uint8`` → same shape and dtype.
    """
    p = _check_patches(patches)
    od = -np.log(np.maximum(p.astype(np.float32) / 255.0, _OD_FLOOR))
    conc = od @ hed_from_rgb.astype(np.float32)
    n = len(p)
    a = rng.uniform(1 - scale_sigma, 1 + scale_sigma, (n, 1, 1, 3)).astype(np.float32)
    b = rng.uniform(-bias_od, bias_od, (n, 1, 1, 3)).astype(np.float32)
    rgb = np.exp(-((conc * a + b) @ rgb_from_hed.astype(np.float32)))
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def augment_support(patches: np.ndarray, labels: np.ndarray, cfg: MitosisConfig) -> tuple[np.ndarray, np.ndarray]:
    """The deterministic few-shot augmentation: every patch at :func:`rotations_for` its label, plus (if
    ``cfg.adapt_flips``) the flipped copies. Returns ``(M, P, P, 3) uint8`` patches and ``(M,) int64`` labels."""
    p = _check_patches(patches)
    y = np.asarray(labels, np.int64)
    flips = [(False, False), (True, False), (False, True), (True, True)] if cfg.adapt_flips else [(False, False)]
    xs, ys = [], []
    for label in (0, 1):
        sel = p[y == label]
        if not len(sel):
            continue
        for deg in rotations_for(label, cfg):
            rot = rotate_patches(sel, deg)
            for fr, fc in flips:
                xs.append(flip_patches(rot, fr, fc))
                ys.append(np.full(len(sel), label, np.int64))
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------------------------------ model


class MitosisNet(nn.Module):
    """Small GroupNorm CNN: stages of (3x3 conv → GroupNorm → ReLU → 2x2 max-pool), global average pool, and a
    linear ``head`` to ``n_classes`` raw logits. Input ``(B, 3, P, P) float32`` RGB in [0, 1]; the input
    normalisation (``cfg.normalise``) is part of the model so callers never need to know it."""

    def __init__(self, cfg: MitosisConfig, n_classes: int = 2) -> None:
        super().__init__()
        self.cfg = cfg
        chans = (3, *cfg.channels)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), group_norm(b, cfg.groups), nn.ReLU(inplace=True),
                          nn.MaxPool2d(2))
            for a, b in zip(chans[:-1], chans[1:], strict=True))
        self.head = nn.Linear(cfg.channels[-1], n_classes)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.normalise == "patch":
            mean = x.mean(dim=(2, 3), keepdim=True)
            return (x - mean) / x.std(dim=(2, 3), keepdim=True).clamp_min(_NORM_STD_FLOOR)
        return (x - _FIXED_MEAN) / _FIXED_STD

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stages ``start:stop`` on ``x`` (the raw [0, 1] input when ``start == 0``); feature maps out."""
        if start == 0:
            x = self.normalise(x)
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, channels[-1])`` pooled features."""
        return self.run_stages(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def to_tensor(patches: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(N, P, P, 3) uint8`` → ``(N, 3, P, P) float32`` in [0, 1] on ``device``."""
    p = _check_patches(patches)
    return torch.from_numpy(np.ascontiguousarray(p)).to(device).permute(0, 3, 1, 2).float().div_(255.0)


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on ``device``; a copy when it lives elsewhere (the caller's model is never moved)."""
    here = next(model.parameters()).device
    return model if here == device else copy.deepcopy(model).to(device)


def classify(model: MitosisNet, patches: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Probability of class 1 (mitotic, or atypical for an adapted model) per patch: ``(N,) float32``."""
    p = _check_patches(patches)
    dev = get_device(str(device))
    net = _on(model, dev)
    out = []
    with torch.inference_mode():
        for i in range(0, len(p), _CHUNK):
            out.append(torch.softmax(net(to_tensor(p[i:i + _CHUNK], dev)), dim=1)[:, 1].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def decide(probabilities: np.ndarray, cfg: MitosisConfig) -> np.ndarray:
    """``(N,) bool``: probability at/above ``cfg.threshold``."""
    return np.asarray(probabilities) >= cfg.threshold


# ------------------------------------------------------------------------------------------ few-shot adaptation


def _prototype_head(head: nn.Linear, feats: torch.Tensor, y: torch.Tensor) -> None:
    """Initialise a new head as the nearest-class-mean classifier of ``feats`` (weight imprinting)."""
    with torch.no_grad():
        for k in range(head.out_features):
            mu = feats[y == k].mean(0)
            head.weight[k] = mu
            head.bias[k] = -0.5 * mu.dot(mu)


def adapt_classifier(
    model: MitosisNet,
    patches: np.ndarray,
    labels: np.ndarray,
    cfg: MitosisConfig,
    *,
    devices: str | Sequence[str] | None = "cpu",
    new_head: bool = False,
) -> Generator[dict, None, dict[str, torch.Tensor]]:
    """Few-shot adaptation from a handful of clicked patches; never mutates ``model``.

    Args:
        model: a (pretrained) :class:`MitosisNet`.
        patches: ``(N, P, P, 3) uint8`` support patches (P = ``cfg.patch_px``).
        labels: ``(N,)`` 0/1 labels (1 = positive: mitotic, or atypical for the atypical-vs-normal task); both
            classes must be present.
        cfg: ``adapt_steps``, ``adapt_lr``, ``adapt_weight_decay``, ``adapt_stages``, rotations/flips.
        devices: device set (:func:`~.devices.resolve_devices`); the problem is small, the first device runs it.
        new_head: start from a new head initialised at the class means of the support features (for a new
            question such as atypical vs normal) instead of the model's head.

    Yields ``{"step", "steps", "loss"}`` after every step; returns the adapted state dict (CPU tensors), loadable
    into ``MitosisNet(model.cfg)``. The support is augmented by :func:`augment_support`; only the head and the
    last ``cfg.adapt_stages`` conv stages are trained, on features of the frozen stages computed once.
    """
    p = _check_patches(patches)
    y = np.asarray(labels)
    if y.shape != (len(p),) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be (N,) = ({len(p)},) values in {{0, 1}}, got shape {y.shape}")
    if len(np.unique(y)) < 2:
        raise ValueError("the support needs at least one positive (1) and one negative (0) patch")
    if p.shape[1] != model.cfg.patch_px:
        raise ValueError(f"support patches are {p.shape[1]} px, the model expects {model.cfg.patch_px} px")
    if not 0 <= cfg.adapt_stages <= len(model.stages):
        raise ValueError(f"cfg.adapt_stages={cfg.adapt_stages} not in [0, {len(model.stages)}]")
    dev = resolve_devices(devices)[0]
    xs, ys = augment_support(p, y, cfg)
    net = copy.deepcopy(model).to(dev)
    net.train()
    frozen = len(net.stages) - cfg.adapt_stages
    with torch.no_grad():
        cached = torch.cat([net.run_stages(to_tensor(xs[i:i + _CHUNK], dev), 0, frozen)
                            for i in range(0, len(xs), _CHUNK)])
    yt = torch.from_numpy(ys).to(dev)
    if new_head:
        net.head = nn.Linear(net.head.in_features, 2).to(dev)
        with torch.no_grad():
            _prototype_head(net.head, net.run_stages(cached, frozen).mean(dim=(2, 3)), yt)
    params = [q for s in net.stages[frozen:] for q in s.parameters()] + list(net.head.parameters())
    for q in net.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    counts = torch.bincount(yt, minlength=2).float()
    weight = (counts.sum() / (2 * counts)) if cfg.adapt_class_balance else None
    opt = torch.optim.Adam(params, lr=cfg.adapt_lr, weight_decay=cfg.adapt_weight_decay)
    for step in range(cfg.adapt_steps):
        logits = net.head(net.run_stages(cached, frozen).mean(dim=(2, 3)))
        loss = F.cross_entropy(logits, yt, weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield {"step": step + 1, "steps": cfg.adapt_steps, "loss": float(loss.detach())}
    return {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}


def adapted_model(model: MitosisNet, state: dict[str, torch.Tensor]) -> MitosisNet:
    """A new :class:`MitosisNet` with ``model``'s config and an adapted ``state`` loaded strictly."""
    net = MitosisNet(model.cfg, n_classes=int(state["head.weight"].shape[0]))
    net.load_state_dict(state, strict=True)
    return net.eval()


def patches_at(image, points: np.ndarray, mpp: float, cfg: MitosisConfig) -> np.ndarray:
    """:func:`extract_patches` of ``image`` at a few ``points (N, 2)`` (row, col), reading only a window around each
    point: ``image`` is any ``(H, W, 3)`` uint8 array or region reader sliced as ``image[r0:r1, c0:c1]`` (e.g. a
    :class:`~.slide.LazyImage` of a slide). Same patches as on the whole image; ``(N, P, P, 3) uint8``."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    h, w = int(image.shape[0]), int(image.shape[1])
    outside = points_outside(pts, (h, w))
    if outside.size:
        listed = ", ".join(f"(row {pts[i, 0]:g}, col {pts[i, 1]:g})" for i in outside[:5])
        raise ValueError(f"{outside.size} point(s) lie outside the {h}x{w} image: {listed}")
    side = patch_side_px(mpp, cfg) + 2  # the window of extract_patches plus a pixel of rounding on each side
    out = np.empty((len(pts), cfg.patch_px, cfg.patch_px, 3), np.uint8)
    for i, (r, c) in enumerate(pts):
        r0, c0 = max(0, int(r) - side), max(0, int(c) - side)
        crop = np.asarray(image[r0:min(h, int(r) + side + 1), c0:min(w, int(c) + side + 1)])
        out[i] = extract_patches(crop, [[r - r0, c - c0]], mpp, cfg)[0][0]
    return out


def adapt_from_points(
    image, points: np.ndarray, labels: np.ndarray, mpp: float, *, model: MitosisNet | str | os.PathLike | None = None,
    steps: int | None = None, devices: str | Sequence[str] = "cpu", source: str = "",
) -> Generator[dict, None, tuple[MitosisNet, dict]]:
    """Adapt a mitosis classifier to a user's clicked examples of one image (what the CLI's ``adapt-mitosis`` and
    the GUI's *Mitosis classifier* run).

    Args:
        image: ``(H, W, 3)`` uint8 array or region reader (:func:`patches_at`: only windows around the points are read).
        points: ``(N, 2)`` (row, col) image pixels of the clicked examples.
        labels: ``(N,)`` 1 = mitotic, 0 = not mitotic; at least one of each.
        mpp: µm per pixel of ``image`` (the patches are ``cfg.patch_um`` µm).
        model: the base classifier: a :class:`MitosisNet`, a saved model's path, or None (the bundled one). Its
            head is fine-tuned (same classes); its config gives the patch geometry and the adaptation settings.
        steps: adaptation steps (default: the base config's ``adapt_steps``).
        source: names the image in the provenance.

    Yields ``{"stage": "examples", "done", "total"}`` while reading patches, then :func:`adapt_classifier`'s steps
    with ``"stage": "adapt"``. Returns the adapted model (CPU, eval mode) and ``{"adapted_from": provenance}`` for
    :func:`save_mitosis_model`'s ``extra``.
    """
    y = np.asarray(labels).reshape(-1)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(y) != len(pts) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be {len(pts)} values of 1 (mitotic) or 0 (not mitotic), got {y.tolist()[:10]}")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"the examples need at least one mitotic (1) and one non-mitotic (0) point; got {n_pos} "
                         f"mitotic and {n_neg} non-mitotic")
    base = "bundled" if model is None else model if isinstance(model, MitosisNet) else str(model)
    net = model if isinstance(model, MitosisNet) else load_mitosis_model(model)[0]
    cfg = net.cfg if steps is None else dataclasses.replace(net.cfg, adapt_steps=int(steps))
    yield {"stage": "examples", "done": 0, "total": len(pts)}
    patches = patches_at(image, pts, mpp, net.cfg)
    yield {"stage": "examples", "done": len(pts), "total": len(pts)}
    state = yield from relay(adapt_classifier(net, patches, y.astype(np.int64), cfg, devices=devices),
                             lambda p: {**p, "stage": "adapt"})
    info = {"image": str(source), "mpp": float(mpp), "n_mitotic": n_pos, "n_not_mitotic": n_neg,
            "steps": cfg.adapt_steps, "base_model": base if isinstance(base, str) else "(in memory)"}
    return adapted_model(net, state), {"adapted_from": info}


# ------------------------------------------------------------------------------------------ weights


def save_mitosis_model(model: MitosisNet, path: str | os.PathLike, *, classes: Sequence[str] = MITOSIS_CLASSES,
                       extra: dict | None = None) -> Path:
    """Write ``<stem>.safetensors`` + ``<stem>.json`` (config, classes, SHA-256, commit, ``extra`` provenance)."""
    wpath, jpath = stem_paths(path)
    if len(classes) != model.head.out_features:
        raise ValueError(f"{len(classes)} class names for a head with {model.head.out_features} outputs")
    _atomic_save_tensors(dict(model.state_dict()), wpath)
    desc = {"format": MITOSIS_FORMAT, "version": FORMAT_VERSION, "config": to_dict(model.cfg),
            "classes": list(classes), "weights_sha256": file_sha256(wpath), "commit": git_commit(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    _atomic_write_json(desc, jpath)
    return wpath


def load_mitosis_model(path: str | os.PathLike | None = None) -> tuple[MitosisNet, dict]:
    """Load ``(model, description)`` on CPU, strictly; ``None`` = the bundled classifier. ValueError naming the
    file for a missing, corrupt, modified or mismatching weights/description file."""
    wpath, jpath = stem_paths(path if path is not None else BUNDLED_WEIGHTS)
    try:
        desc = json.loads(jpath.read_text())
    except FileNotFoundError:
        raise ValueError(f"{jpath}: description file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{jpath}: not valid JSON ({e})") from None
    if not isinstance(desc, dict) or desc.get("format") != MITOSIS_FORMAT:
        raise ValueError(f"{jpath}: 'format' must be {MITOSIS_FORMAT!r}")
    cfg = from_dict(MitosisConfig, desc.get("config", {}), source=f"{jpath}: config")
    classes = desc.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"{jpath}: 'classes' must list at least 2 class names")
    tensors = _load_tensors(wpath)
    if desc.get("weights_sha256") and file_sha256(wpath) != desc["weights_sha256"]:
        raise ValueError(f"{wpath}: SHA-256 does not match {jpath.name} (file modified or corrupt)")
    model = MitosisNet(cfg, n_classes=len(classes))
    try:
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{wpath}: weights do not match the architecture in {jpath.name} ({e})") from None
    return model.eval(), desc
