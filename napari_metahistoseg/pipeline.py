"""User-level operations as generators (yield progress dicts, return the result): adapt, predict.

The GUI's Adapt button, ``metahistoseg adapt/predict/evaluate`` and the benchmarks all call these, so the
GUI and the CLI give the same results for the same settings.

Progress dicts carry ``stage`` ("features", "adapt", "predict", "instances"), ``step``/``steps`` or
``done``/``total``, and for adaptation ``loss`` and ``eta_s``.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .checkpoints import backbone_sha256, export_head, import_head, load_model
from .config import MAMLConfig, TilingConfig, from_dict, to_dict
from .data.io import to_rgb_uint8
from .data.task import IGNORE
from .devices import resolve_devices
from .maml import adapt_head_on_pixels, balanced_weights, head_pixel_logits, inner_loop, pixel_support, relay, run
from .metrics import ConfusionAccumulator
from .models import (
    COLOUR_BASE,
    MetaHistoSegNet,
    PixelHead,
    adapted_param_names,
    colour_base,
    colour_channels,
    gaussian_smooth,
    to_tensor_image,
)
from .resilience import oom_fallback_gen
from .tiling import predict_tiled

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).parent / "weights"
TASK = "user"  # key of the adapted head inside the model's ModuleDict
GENERIC = "generic"
CONTEXT_PX = 48  # context kept around labelled pixels when cropping the support (model pixels)
COLOUR_STATS_ALL_PX = 4_000_000  # images up to this size: colour statistics over every pixel
COLOUR_STATS_WINDOWS = 64  # larger images (slides): over this many windows on a regular grid
COLOUR_STATS_WINDOW_PX = 256
_BACKBONES: dict[str, Backbone] = {}


@dataclass
class Backbone:
    """A loaded backbone checkpoint (model in eval mode on CPU) with its SHA-256 and learned inner lrs."""

    model: MetaHistoSegNet
    desc: dict
    inner_lrs: dict[str, torch.Tensor]
    sha256: str
    name: str

    @property
    def mpp(self) -> float:
        return self.model.cfg.mpp


def load_backbone(which: str | Path = "default") -> Backbone:
    """``"default"`` (bundled meta-trained), ``"transfer"`` (bundled transfer-learning baseline),
    ``"scratch"`` (same network, random weights, seed 0) or a checkpoint path. Cached per name."""
    key = str(which)
    if key not in ("default", "transfer", "scratch"):  # a file rewritten in place (a training run) reloads
        json_path = Path(key if key.endswith(".json") else key.removesuffix(".safetensors") + ".json")
        key = f"{key}@{json_path.stat().st_mtime_ns}" if json_path.exists() else key
    if key in _BACKBONES:
        return _BACKBONES[key]
    if key == "scratch":
        torch.manual_seed(0)
        model = MetaHistoSegNet(load_backbone("default").model.cfg, {GENERIC: 2}, hover_types=5).eval()
        bb = Backbone(model, {"name": "scratch"}, {}, backbone_sha256(model), "scratch")
    else:
        name = str(which)
        path = WEIGHTS / "backbone" if name == "default" else WEIGHTS / "transfer" if name == "transfer" else Path(name)
        model, desc, lrs = load_model(path)
        if desc["backbone_sha256"] != backbone_sha256(model):
            raise ValueError(f"{path}: backbone SHA-256 does not match its description (file modified?)")
        bb = Backbone(model, desc, lrs, desc["backbone_sha256"], name)
    _BACKBONES[key] = bb
    return bb


@dataclass
class AdaptedHead:
    """The adapted parameters (head, plus decoder/backbone tensors in "decoder"/"all" modes) with provenance."""

    classes: list[str]
    state: dict[str, torch.Tensor]  # names as in MetaHistoSegNet, the head under heads.user.*
    backbone_sha256: str
    maml: MAMLConfig
    mpp: float
    provenance: dict = field(default_factory=dict)
    colours: list[str] | None = None

    @property
    def threshold(self) -> float | None:
        """Foreground-probability threshold of a two-class head's class decision (None: arg-max), calibrated on
        the support at adaptation (:func:`calibrate_threshold`); stored in the provenance, so exported heads keep
        it."""
        t = self.provenance.get("calibrated_threshold")
        return float(t) if t is not None and len(self.classes) == 2 else None

    @property
    def smoothing_um(self) -> float:
        """Sigma (µm) of the Gaussian smoothing of the class probabilities behind the class decision of a two-class
        head (0: none), calibrated on the support with the threshold (:func:`calibrate_smoothing`); in the
        provenance, so exported heads keep it."""
        s = self.provenance.get("calibrated_smoothing_um")
        return float(s) if s is not None and len(self.classes) == 2 else 0.0

    @property
    def colour_sigmas_um(self) -> tuple[float, ...]:
        """Sigmas (µm) of the head's colour inputs (:func:`.models.colour_channels`; empty: the head sees the
        backbone's features only — heads of ``colour_features=False`` and of before session 8); in the
        provenance, so exported heads keep it."""
        return tuple(float(v) for v in self.provenance.get("colour_sigmas_um") or ())

    def colour_input(self, backbone: Backbone, image):
        """``x (B, 3, h, w) -> colour channels`` at the backbone's resolution for tiles of ``image`` (RGB uint8
        array, tensor or :class:`.slide.LazyImage` at its own resolution, whose :func:`image_colour_stats` standardise
        them), or None when the head has no colour inputs."""
        if not self.colour_sigmas_um:
            return None
        stats = image_colour_stats(image, self.maml.colour_tissue_min_od)
        sig = [v / backbone.mpp for v in self.colour_sigmas_um]
        return lambda x: colour_channels(x, stats, sig)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        prov = {**self.provenance, "maml": to_dict(self.maml), "mpp": self.mpp}
        return export_head(path, self.state, backbone_sha=self.backbone_sha256, classes=self.classes,
                           provenance=prov, colours=self.colours)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone) -> AdaptedHead:
        state, desc = import_head(path, backbone_sha=backbone.sha256)
        prov = dict(desc.get("provenance") or {})
        maml = from_dict(MAMLConfig, prov.pop("maml", {}), source=f"{path}: provenance.maml")
        head = cls(list(desc["classes"]), state, desc["backbone_sha256"], maml, float(prov.pop("mpp", backbone.mpp)),
                   prov, desc.get("colours"))
        try:
            head.module_for(backbone)  # shape check now, with a clear error
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return head

    def module_for(self, backbone: Backbone, *, inference: bool = False) -> MetaHistoSegNet:
        """A copy of the backbone model with this head (and any adapted backbone tensors) loaded.

        ``inference=True``: for prediction only — the copy shares the backbone's tensors instead of copying them
        (no grad; moving it to a device or converting its layout replaces its tensors and never writes into them)
        and keeps only the heads a prediction uses (this one and HoVer). A deep copy of all weights cost 20-95 ms
        of host time per prediction on the 2-core VM, a tenth of a GPU's 16 MP prediction."""
        src = backbone.model
        if inference:
            memo = {id(t): nn.Parameter(t.detach(), requires_grad=False) if isinstance(t, nn.Parameter) else t.detach()
                    for t in [*src.parameters(), *src.buffers()]}
            model = copy.deepcopy(src, memo)
            for task in [k for k in model.heads if k != "hover"]:
                del model.heads[task]
        else:
            model = copy.deepcopy(src)
        model.add_head(TASK, len(self.classes), extra_inputs=len(COLOUR_BASE) * len(self.colour_sigmas_um))
        own = model.state_dict()
        for k, v in self.state.items():
            if k == f"heads.{TASK}.net.0.weight" and k in own and v.shape[1] != own[k].shape[1]:
                n_col = own[k].shape[1] - model.backbone.out_channels
                col = f" + {n_col} colour channels of the {len(self.colour_sigmas_um)} sigmas in the head's provenance"
                raise ValueError(f"head tensor {k!r} takes {v.shape[1]} inputs and does not fit this backbone, which "
                                 f"gives {own[k].shape[1]} ({model.backbone.out_channels} features"
                                 f"{col if n_col else ''})")
            if k not in own or own[k].shape != v.shape:
                raise ValueError(f"head tensor {k!r} {tuple(v.shape)} does not fit this backbone "
                                 f"({tuple(own[k].shape) if k in own else 'no such tensor'})")
            own[k] = v.float()
        model.load_state_dict(own, strict=True, assign=inference)  # assign: no write into shared tensors
        return model.requires_grad_(False).eval() if inference else model.eval()


# ------------------------------------------------------------------------------------------ helpers


def rescale(image: np.ndarray, factor: float, *, order: int) -> np.ndarray:
    """Resize by ``factor`` (order 1 for images, 0 for labels); identity within 2 %."""
    from skimage.transform import resize

    if abs(factor - 1) < 0.02:
        return image
    shape = (max(1, round(image.shape[0] * factor)), max(1, round(image.shape[1] * factor))) + image.shape[2:]
    out = resize(image, shape, order=order, preserve_range=True, anti_aliasing=order > 0 and factor < 1)
    return (out + 0.5).astype(image.dtype) if order > 0 else out.astype(image.dtype)


def _check_mpp(m, where: str) -> None:
    if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float, np.floating))
                          or not math.isfinite(m) or m <= 0):
        raise ValueError(f"{where}: mpp must be None or a number > 0 (µm per pixel), got {m!r}")


def _check_support(images, labels, n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"name at least 2 classes, got {n_classes}")
    if len(images) != len(labels) or not images:
        raise ValueError(f"support needs as many label masks as images (got {len(images)} and {len(labels)})")
    present: set[int] = set()
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        if lab.shape != im.shape[:2]:
            raise ValueError(f"support labels {i} have shape {lab.shape}, image has {im.shape[:2]}")
        if lab.dtype != bool and not np.issubdtype(lab.dtype, np.integer):
            if not (np.issubdtype(lab.dtype, np.floating) and np.isfinite(lab).all()
                    and (lab == np.round(lab)).all()):
                raise ValueError(f"support labels {i} must be integer class ids (0..{n_classes - 1}, "
                                 f"{IGNORE} = unknown)")
        if lab.size and lab.min() < 0:
            raise ValueError(f"support labels {i} contain negative class ids")
        vals = np.unique(lab)
        bad = [int(v) for v in vals if v != IGNORE and v >= n_classes]
        if bad:
            raise ValueError(f"support labels {i} contain class ids {bad} but only {n_classes} classes are named")
        present |= {int(v) for v in vals if v != IGNORE}
    if not present:
        raise ValueError("the support has no labelled pixels (everything is 'unknown'): paint some labels")
    if len(present) < 2:
        raise ValueError(f"the support labels only class {present.pop()}: paint at least two classes "
                         "(e.g. some background as well as the objects)")


def array_sha256(a: np.ndarray) -> str:
    """SHA-256 of an array's shape, dtype and C-order bytes (a support image or its labels, as given): names the
    exact support an adapted head was made from in its provenance."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def support_object_um2(labels: Sequence[np.ndarray], mpp: float) -> float | None:
    """Median area (µm²) of a support's labelled objects: the 8-connected components of its non-background classes
    (labels 1.., unknown excluded) in every image, at ``mpp`` µm/px; None when nothing but background is labelled."""
    from scipy import ndimage

    areas = []
    for lab in labels:
        comp, n = ndimage.label((lab > 0) & (lab != IGNORE), structure=np.ones((3, 3), bool))
        if n:
            areas.append(np.bincount(comp.ravel())[1:])
    return float(np.median(np.concatenate(areas))) * mpp ** 2 if areas else None


def colour_sigmas(cfg: MAMLConfig, labels: Sequence[np.ndarray], mpp: float, init: AdaptedHead | None = None
                  ) -> tuple[tuple[float, ...], float | None]:
    """The colour-input sigmas (µm) a head adaptation starts with, and the support's median object area (µm², or
    None): a starting head's own (a head with colour inputs stays one); else ``cfg.colour_sigmas_um`` in head mode
    with ``cfg.colour_features`` when the support's objects (``labels`` at ``mpp`` µm/px) are cell-sized — median
    area ≤ ``cfg.colour_max_object_um2``; colour says little about the extent of a gland (dev data: GlaS lost up to
    0.08 mIoU with them, cells gained 0.02–0.03)."""
    if init is not None and init.colour_sigmas_um:
        return init.colour_sigmas_um, None
    if not (cfg.colour_features and cfg.adapt == "head"):
        return (), None
    area = support_object_um2(labels, mpp)
    return (tuple(cfg.colour_sigmas_um) if area is not None and area <= cfg.colour_max_object_um2 else ()), area


def image_colour_stats(image, tissue_min_od: float = MAMLConfig.colour_tissue_min_od) -> torch.Tensor:
    """Means and standard deviations ``(2, 5)`` of the :func:`.models.colour_base` channels of an RGB uint8 image
    ``(H, W, 3)`` — an array, a :class:`.slide.LazyImage` or a tensor (on its device) — at its own resolution,
    over its tissue pixels (total RGB optical density ≥ ``tissue_min_od``; all pixels if fewer than 1 % are
    tissue): over every pixel up to ``COLOUR_STATS_ALL_PX``, else over ``COLOUR_STATS_WINDOWS`` windows on a
    regular grid (a slide is never read whole). The same rule for an array and the slide it came from, so streamed
    and in-memory predictions agree; skipping the glass makes a slide and a tissue crop of it agree too."""
    h, w = image.shape[:2]
    if h * w <= COLOUR_STATS_ALL_PX:
        parts = [image[:, :]]
    else:
        n, side = math.ceil(math.sqrt(COLOUR_STATS_WINDOWS)), COLOUR_STATS_WINDOW_PX
        rows = np.linspace(0, max(0, h - side), n).astype(int)
        cols = np.linspace(0, max(0, w - side), n).astype(int)
        parts = [image[r:r + side, c:c + side] for r in rows for c in cols]
    if isinstance(image, torch.Tensor):  # a uint8 image tensor on a GPU (prediction there): computed there
        px = torch.cat([p.reshape(-1, 3) for p in parts]).float().div_(255.0)
    else:
        px = np.concatenate([np.asarray(p).reshape(-1, 3) for p in parts])
        px = torch.from_numpy(px.astype(np.float32) / 255.0)
    base = colour_base(px.t().reshape(1, 3, -1, 1))[0, :, :, 0].double()
    tissue = -torch.log(px.clamp_min(1 / 255)).sum(1) >= tissue_min_od
    if int(tissue.sum()) >= max(2, 0.01 * len(tissue)):
        base = base[:, tissue]
    return torch.stack([base.mean(1), base.std(1, correction=0).clamp_min(1e-3)]).float()  # 1 px: std 0, not NaN


def _crop_to_labels(image: np.ndarray, lab: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    rr, cc = np.nonzero(lab != IGNORE)
    r0, r1 = max(0, rr.min() - margin), min(lab.shape[0], rr.max() + margin + 1)
    c0, c1 = max(0, cc.min() - margin), min(lab.shape[1], cc.max() + margin + 1)
    return image[r0:r1, c0:c1], lab[r0:r1, c0:c1]


def initial_head(backbone: Backbone, n_classes: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The meta-learned generic head expanded to ``n_classes``: class 0 = its background row, every other class
    its foreground row plus a small seeded perturbation (so classes can separate)."""
    gen = backbone.model.heads[GENERIC]
    st = {k: v.detach().clone() for k, v in gen.state_dict().items()}
    last = sorted(k for k in st if k.endswith(".weight"))[-1]
    bias = last[: -len("weight")] + "bias"
    w, b = st[last], st[bias]
    if n_classes != w.shape[0]:
        g = torch.Generator().manual_seed(seed)
        rows = [w[0]] + [w[1] + 0.01 * torch.randn(w[1].shape, generator=g) for _ in range(n_classes - 1)]
        st[last] = torch.stack(rows)
        st[bias] = torch.cat([b[:1], b[1:2].repeat(n_classes - 1)])
    return {f"heads.{TASK}.{k}": v for k, v in st.items()}


_REPLICAS: dict[tuple[int, str], torch.nn.Module] = {}


def replica(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model itself on CPU, or a cached copy of it on another device (the caller's model never moves)."""
    if torch.device(device).type == "cpu":
        return model
    key = (id(model), str(device))
    if key not in _REPLICAS:
        _REPLICAS[key] = copy.deepcopy(model).to(device).eval()
    return _REPLICAS[key]


def release_replicas(model: torch.nn.Module) -> None:
    """Drop the cached device copies of ``model`` (a throw-away model, e.g. a training validation's)."""
    for key in [key for key in _REPLICAS if key[0] == id(model)]:
        del _REPLICAS[key]


def _features(model: MetaHistoSegNet, image: np.ndarray, device: torch.device,
              tiling: TilingConfig) -> Generator[dict, None, torch.Tensor]:
    """Decoder features ``(F, H, W)`` of one image at model resolution (tiled when large). Yields the tiling's
    progress (``{"stage": "predict", "done", "total"}`` per batch of tiles), so the work can be cancelled between
    tiles. Out of memory (a large support image on a small GPU): retried with a smaller batch, then smaller tiles.
    """
    rep = replica(model, device)
    maps = yield from oom_fallback_gen(
        lambda t: predict_tiled(lambda x: {"f": rep.features(x)}, image, cfg=t, devices=[device],
                                channels={"f": model.backbone.out_channels}), tiling)
    return torch.from_numpy(maps["f"])


# ------------------------------------------------------------------------------------------ adapt


def adapt(
    backbone: Backbone,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    classes: Sequence[str],
    *,
    mpp: float | Sequence[float | None] | None = None,
    cfg: MAMLConfig | None = None,
    devices: str | Sequence[str] | None = "cpu",
    init: AdaptedHead | None = None,
    tiling: TilingConfig | None = None,
) -> Generator[dict, None, AdaptedHead]:
    """Adapt a head for ``classes`` on support ``images (H,W,3)`` with ``labels (H,W)`` (IGNORE = unknown)."""
    cfg = cfg or MAMLConfig()
    tiling = tiling or TilingConfig()
    devs = resolve_devices(devices)
    images = [to_rgb_uint8(im, source=f"support image {i}") for i, im in enumerate(images)]
    labels = [np.asarray(lab) for lab in labels]
    _check_support(images, labels, len(classes))
    mpps = list(mpp) if isinstance(mpp, (list, tuple)) else [mpp] * len(images)
    if len(mpps) != len(images):
        raise ValueError(f"{len(mpps)} mpp values for {len(images)} support images")
    for i, m in enumerate(mpps):
        _check_mpp(m, f"support image {i}")
    if init is not None and init.colour_sigmas_um and cfg.adapt != "head":
        raise ValueError(f"the starting head has colour inputs: it can be adapted in head mode only, not "
                         f"{cfg.adapt!r}")
    sup = []
    for im, lab, m in zip(images, labels, mpps, strict=True):
        f = (m or backbone.mpp) / backbone.mpp
        im2, lab2 = rescale(im, f, order=1), rescale(lab.astype(np.uint8), f, order=0)
        sup.append(_crop_to_labels(im2, lab2, CONTEXT_PX))
    sigmas_um, object_um2 = colour_sigmas(cfg, [lab for _, lab in sup], backbone.mpp, init)
    stats = ([image_colour_stats(im, cfg.colour_tissue_min_od) for im in images] if sigmas_um
             else [None] * len(images))
    start = init.state if init is not None else initial_head(backbone, len(classes), seed=cfg.seed)
    if init is not None and len(init.classes) != len(classes):
        raise ValueError(f"the starting head has {len(init.classes)} classes, the support names {len(classes)}")
    t0 = time.time()
    balance = support_balance(cfg, [lab for _, lab in sup], len(classes))
    threshold = smoothing = check = None
    if cfg.adapt == "head":
        fast, threshold, smoothing, sigmas_um, check = yield from _adapt_head(
            backbone, sup, len(classes), start, cfg, devs, tiling, t0, balance, stats, sigmas_um)
    else:
        fast = yield from _adapt_full(backbone, sup, len(classes), start, cfg, devs, t0, balance)
    prov = {"support": [{"shape": list(im.shape[:2]), "labelled_px": int((lab != IGNORE).sum()),
                         "class_px": {str(c): int((lab == c).sum()) for c in range(len(classes))},
                         "image_sha256": array_sha256(im0), "labels_sha256": array_sha256(lab0)}
                        for (im, lab), im0, lab0 in zip(sup, images, labels, strict=True)],
            "devices": [str(d) for d in devs], "adapt_seconds": round(time.time() - t0, 3),
            "class_balance_used": balance, "calibrated_threshold": threshold,
            "calibrated_smoothing_um": smoothing,
            "colour_sigmas_um": list(sigmas_um) or None, "colour_check_miou": check,
            "support_object_um2": None if object_um2 is None else round(object_um2, 1),
            "backbone": backbone.name}
    log.info("adapted %s on %s in %.2f s", cfg.adapt, [str(d) for d in devs], time.time() - t0)
    return AdaptedHead(list(classes), {k: v.detach().cpu() for k, v in fast.items()}, backbone.sha256, cfg,
                       backbone.mpp, prov)


def support_balance(cfg: MAMLConfig, labels: Sequence[np.ndarray], n_classes: int) -> bool:
    """Whether adaptation balances the classes: ``cfg.class_balance``, or for ``"auto"``: balanced when the task
    has more than two classes (rare classes would vanish under their natural prior) or when less than
    ``cfg.dense_label_fraction`` of the (cropped) support pixels are labelled — sparse strokes or clicks, whose
    class ratio says nothing about the image; a densely painted two-class support keeps its class prior.
    (Measured on the dev data: +0.03 mIoU on MoNuSeg, +0.04 on BM-Graz, −0.12 on the 5-class CoNSeP tiles if
    unbalanced; benchmarks/results/tune_adapt_v2.md.)"""
    if cfg.class_balance != "auto":
        return bool(cfg.class_balance)
    if n_classes > 2:
        return True
    labelled = sum(int((lab != IGNORE).sum()) for lab in labels)
    return labelled < cfg.dense_label_fraction * sum(lab.size for lab in labels)


def _progress(p: dict, t0: float, stage: str) -> dict:
    el = time.time() - t0
    return {**p, "stage": stage, "elapsed_s": el, "eta_s": el / max(p["step"], 1) * (p["steps"] - p["step"])}


def colour_support(im: np.ndarray, idx: torch.Tensor, stats: torch.Tensor, sigmas_px: Sequence[float]
                   ) -> torch.Tensor:
    """The colour inputs ``(P, 5 * len(sigmas_px))`` of the support pixels at flat indices ``idx`` of ``im``
    (:func:`support_indices`), one sigma at a time (a large support region never holds all its colour channels at
    once)."""
    x = to_tensor_image(im)
    return torch.cat([colour_channels(x, stats, [s])[0].reshape(len(COLOUR_BASE), -1)[:, idx].t()
                      for s in sigmas_px], 1)


def support_indices(lab: np.ndarray, n_classes: int, *, max_pixels: int, seed: int, stratified: bool
                    ) -> torch.Tensor:
    """Flat indices ``(P,)`` into ``lab (H, W)`` of the pixels :func:`.maml.pixel_support` picks with the same
    arguments, in its order."""
    flat = torch.arange(lab.size, dtype=torch.float64).reshape(1, 1, *lab.shape)
    return pixel_support(flat, torch.from_numpy(lab)[None], n_classes, max_pixels=max_pixels, seed=seed,
                         stratified=stratified)[0][:, 0].long()


def colour_window(im: np.ndarray, stats: torch.Tensor, sigmas_px: Sequence[float], side: int) -> torch.Tensor:
    """The colour inputs ``(5 * len(sigmas_px), h, w)`` of :func:`calibration_window`'s centre window of ``im``,
    computed with ``3 * max(sigmas_px)`` pixels of context around it (as a tile's halo), float16."""
    h, w = im.shape[:2]
    r0, c0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    r1, c1 = min(h, r0 + side), min(w, c0 + side)
    m = math.ceil(3 * max(sigmas_px))
    a0, b0 = max(0, r0 - m), max(0, c0 - m)
    col = colour_channels(to_tensor_image(im[a0:min(h, r1 + m), b0:min(w, c1 + m)]), stats, sigmas_px)[0]
    return col[:, r0 - a0:r1 - a0, c0 - b0:c1 - b0].to(torch.float16).clone()


def _adapt_head(backbone, sup, n_classes, start, cfg, devs, tiling, t0, balance, stats, sigmas_um
                ) -> Generator[dict, None, dict]:
    model = backbone.model
    parts = []
    calibrating = calibrates(cfg, [lab for _, lab in sup], n_classes)
    for i, (im, lab) in enumerate(sup):
        yield {"stage": "features", "step": i, "steps": len(sup), "elapsed_s": time.time() - t0}
        # per-tile progress of this image's features (the worker can cancel between tiles)
        feats = yield from relay(_features(model, im, devs[i % len(devs)], tiling),
                                 lambda p, i=i: {"stage": "features", "step": i, "steps": len(sup), "tile": p["done"],
                                                 "tiles": p["total"], "elapsed_s": time.time() - t0})
        parts.append(support_part(backbone, feats, im, lab, i, len(sup), n_classes, cfg, balance, calibrating,
                                  stats[i], sigmas_um))
    return (yield from fit_head(backbone, parts, n_classes, start, cfg, devs, balance, calibrating, sigmas_um, t0))


def support_part(backbone: Backbone, feats: torch.Tensor, im: np.ndarray, lab: np.ndarray, i: int, n_images: int,
                 n_classes: int, cfg: MAMLConfig, balance: bool, calibrating: bool, stats: torch.Tensor | None,
                 sigmas_um: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor, tuple | None, torch.Tensor]:
    """What head adaptation keeps of support image ``i`` of ``n_images`` (model resolution: ``feats (F, H, W)``,
    ``im``, ``lab``): its sampled pixels ``x (P, F [+ colour])``, ``y (P,)``, when the smoothing is calibrated its
    calibration window, and the fold (0/1) of every pixel for :func:`colour_check` — image ``i``'s parity when
    there are several support images, else its left or right half (columns split at the pixels' median); the
    features themselves can then be freed."""
    sig = [v / backbone.mpp for v in sigmas_um]
    sample = {"max_pixels": max(1, cfg.max_support_pixels // n_images), "seed": cfg.seed + i, "stratified": balance}
    x, y = pixel_support(feats[None], torch.from_numpy(lab)[None], n_classes, **sample)
    fold = torch.full((len(y),), i % 2, dtype=torch.int64)
    if sig:
        idx = support_indices(lab, n_classes, **sample)  # the same picks, as flat indices
        x = torch.cat([x, colour_support(im, idx, stats, sig)], 1)
        if n_images == 1 and len(idx):  # one image: its left and right halves (columns split at the median)
            c = (idx % lab.shape[1]).float()
            fold = (c >= c.median()).long()
    window = None
    if calibrating and cfg.calibrate_smoothing:
        f, wl = calibration_window(feats, lab, cfg.calibration_window_px)
        if sig:
            f = torch.cat([f, colour_window(im, stats, sig, cfg.calibration_window_px)])
        window = (f, wl)
    return x, y, window, fold


def fit_head(backbone: Backbone, parts: Sequence[tuple], n_classes: int, start: dict[str, torch.Tensor],
             cfg: MAMLConfig, devs: Sequence[torch.device], balance: bool, calibrating: bool,
             sigmas_um: Sequence[float], t0: float, check: bool = True) -> Generator[dict, None, tuple]:
    """The head's inner loop on the support pixels of :func:`support_part`, then the calibrations: ``(fast weights
    named as in the model, threshold, smoothing, colour sigmas, colour check)``. Colour inputs (``sigmas_um``) of a
    head that has none yet start with zero weights (the same head function) and take ``cfg.colour_lr_scale`` x its
    step size; they are kept only if :func:`colour_check` finds that they help by ``cfg.colour_min_gain`` (``check``
    and ``cfg.colour_check``; a check without data — a fold lacking a class — drops them; a starting head that
    already has them keeps them)."""
    model = backbone.model
    x = torch.cat([p[0] for p in parts]).to(devs[0])
    y = torch.cat([p[1] for p in parts]).to(devs[0])
    fold = torch.cat([p[3] for p in parts]).to(devs[0])
    windows = [p[2] for p in parts if p[2] is not None]
    n_feat = model.backbone.out_channels
    prefix = f"heads.{TASK}."
    init = {k[len(prefix):]: v.detach().clone().to(devs[0]) for k, v in start.items() if k.startswith(prefix)}
    first = "net.0.weight"
    scores = None
    if sigmas_um and init[first].shape[1] == n_feat and check and cfg.colour_check:
        scores = colour_check(backbone, x, y, fold, n_classes, init, cfg, balance)
        if scores is None or scores["colour"] - scores["features"] < cfg.colour_min_gain:  # no evidence: features
            sigmas_um = ()
            x = x[:, :n_feat]
            windows = [(f[:n_feat], wl) for f, wl in windows]
    template, init, lrs = _head_start(backbone, init, len(COLOUR_BASE) * len(sigmas_um), n_classes, cfg)
    gen = adapt_head_on_pixels(template, init, x, y, n_classes=n_classes, steps=cfg.steps, lr=cfg.inner_lr,
                               first_order=cfg.first_order, balance=balance, lrs=lrs, devices=devs)
    fast = yield from relay(gen, lambda p: _progress(p, t0, "adapt"))
    threshold = calibrate_threshold(template, fast, x, y, cfg) if calibrating else None
    smoothing = (calibrate_smoothing(template, fast, windows, threshold, cfg, backbone.mpp)
                 if calibrating and cfg.calibrate_smoothing else None)
    return {prefix + k: v for k, v in fast.items()}, threshold, smoothing, tuple(sigmas_um), scores


def colour_head(backbone: Backbone, classes: Sequence[str], cfg: MAMLConfig | None = None, *, noise: float = 0.0,
                seed: int = 0) -> AdaptedHead:
    """An unadapted head with ``cfg``'s colour inputs (``MAMLConfig().colour_sigmas_um`` by default): the
    meta-learned head with zero colour weights, plus ``noise`` × N(0, 1) (seeded) on its first layer so that the
    colour inputs count — for timings and tests of colour heads; :func:`adapt` builds its own."""
    cfg = cfg or MAMLConfig()
    pre = f"heads.{TASK}."
    init = {k[len(pre):]: v for k, v in initial_head(backbone, len(classes), seed=seed).items()}
    _, state, _ = _head_start(backbone, init, len(COLOUR_BASE) * len(cfg.colour_sigmas_um), len(classes), cfg)
    w = state["net.0.weight"]
    state["net.0.weight"] = w + noise * torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
    return AdaptedHead(list(classes), {pre + k: v for k, v in state.items()}, backbone.sha256, cfg, backbone.mpp,
                       {"colour_sigmas_um": list(cfg.colour_sigmas_um)})


def _head_start(backbone: Backbone, init: dict[str, torch.Tensor], extra: int, n_classes: int, cfg: MAMLConfig):
    """``(template, initial parameters, step sizes)`` of a head with ``extra`` colour inputs: a head that has none
    gets zero weights for them; they take ``cfg.colour_lr_scale`` x the head's first-layer step size."""
    n_feat = backbone.model.backbone.out_channels
    template = PixelHead(n_feat + extra, n_classes, backbone.model.cfg.head_hidden)
    init = dict(init)
    lrs = _learned_lrs(backbone, init, cfg)
    first = "net.0.weight"
    if init[first].shape[1] == n_feat and extra:
        w = init[first]
        init[first] = torch.cat([w, w.new_zeros(w.shape[0], extra, *w.shape[2:])], 1)
    if extra:
        step = torch.full_like(init[first], float(lrs[first]) if lrs and first in lrs else cfg.inner_lr)
        step[:, n_feat:] *= cfg.colour_lr_scale
        lrs = {**(lrs or {}), first: step}
    return template, init, lrs


def colour_check(backbone: Backbone, x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, n_classes: int,
                 init: dict[str, torch.Tensor], cfg: MAMLConfig, balance: bool) -> dict | None:
    """Two-fold cross-check of the colour inputs on the support: a head with and one without them is fitted on
    each fold's pixels (``x (P, features + colour)``, ``fold`` 0/1) and scored (pooled mIoU, arg-max) on the other
    fold's (at most ``cfg.colour_check_pixels // 2`` fitting pixels per fold). ``{"features": mIoU, "colour": mIoU}``,
    or None when a fold lacks pixels of every class of the other (nothing to check on). The colour inputs help where
    the backbone never saw the objects (BM-Graz cells) and can hurt where its features already say more than the
    colour of a few images (GlaS glands)."""
    n_feat = backbone.model.backbone.out_channels
    extra = x.shape[1] - n_feat
    present = [set(torch.unique(y[fold == f]).tolist()) for f in (0, 1)]
    if len(present[0]) < 2 or present[0] != present[1]:
        return None
    accs = {"features": ConfusionAccumulator(n_classes), "colour": ConfusionAccumulator(n_classes)}
    gen = torch.Generator().manual_seed(cfg.seed)
    for f in (0, 1):
        fit, held = torch.nonzero(fold == f).flatten(), fold != f
        cap = max(1, cfg.colour_check_pixels // 2)
        if len(fit) > cap:  # each fold's fits on a seeded sample (the check costs about one adaptation)
            fit = fit[torch.randperm(len(fit), generator=gen)[:cap].sort().values.to(fit.device)]
        for name, cols, ex in (("features", n_feat, 0), ("colour", n_feat + extra, extra)):
            template, start, lrs = _head_start(backbone, init, ex, n_classes, cfg)
            fast = run(adapt_head_on_pixels(template, start, x[fit][:, :cols], y[fit], n_classes=n_classes,
                                            steps=cfg.steps, lr=cfg.inner_lr, first_order=True, balance=balance,
                                            lrs=lrs, devices=[x.device]))
            with torch.no_grad():
                pred = head_pixel_logits(template, fast, x[held][:, :cols]).argmax(1)
            accs[name].update(pred.cpu().numpy()[None], y[held].cpu().numpy()[None])
    return {name: round(acc.miou(), 4) for name, acc in accs.items()}


def calibrates(cfg: MAMLConfig, labels: Sequence[np.ndarray], n_classes: int) -> bool:
    """Whether head adaptation calibrates the decision threshold (:func:`calibrate_threshold`): on for a two-class
    support of which at least ``cfg.dense_label_fraction`` is labelled — strokes or clicks say nothing about how
    much of the image is foreground, so a threshold fitted on them would be arbitrary."""
    if not (cfg.calibrate_threshold and cfg.adapt == "head" and n_classes == 2):
        return False
    labelled = sum(int((lab != IGNORE).sum()) for lab in labels)
    return labelled >= cfg.dense_label_fraction * sum(lab.size for lab in labels)


def threshold_grid(cfg: MAMLConfig) -> np.ndarray:
    """The foreground-probability thresholds calibration tries: ``cfg.threshold_min..max`` by ``step``."""
    return np.round(np.arange(cfg.threshold_min, cfg.threshold_max + cfg.threshold_step / 2, cfg.threshold_step), 6)


def calibrate_threshold(head: torch.nn.Module, fast: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                        cfg: MAMLConfig) -> float:
    """The foreground-probability threshold that maximises the mIoU of the support pixels ``x (N, F)`` with labels
    ``y (N,)`` under the two-class head ``fast`` (grid ``cfg.threshold_min..max`` by ``step``; of equal scores the
    value closest to 0.5 wins, so an uninformative support keeps the plain arg-max)."""
    grid = threshold_grid(cfg)
    grid = grid[np.argsort(np.abs(grid - 0.5), kind="stable")]  # argmax below keeps the first (closest) of ties
    with torch.no_grad():
        p = head_pixel_logits(head, fast, x).softmax(1)[:, 1].cpu().numpy()
    t = y.cpu().numpy().astype(bool)
    pred = p[None, :] >= grid[:, None]
    i1, u1 = (pred & t).sum(1), (pred | t).sum(1)
    i0, u0 = (~pred & ~t).sum(1), (~pred | ~t).sum(1)
    miou = (i0 / np.maximum(u0, 1) + i1 / np.maximum(u1, 1)) / 2
    return float(np.round(grid[int(np.argmax(miou))], 6))



def calibration_window(feats: torch.Tensor, lab: np.ndarray, side: int) -> tuple[torch.Tensor, np.ndarray]:
    """The centre ``side x side`` window of a support image's features ``(F, H, W)`` (a float16 copy, so the whole
    map can be freed) and of its labels, for :func:`calibrate_smoothing`."""
    h, w = lab.shape
    r0, c0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    box = (slice(r0, r0 + side), slice(c0, c0 + side))
    return feats[(slice(None), *box)].to(torch.float16).clone(), lab[box]


def calibrate_smoothing(head: torch.nn.Module, fast: dict[str, torch.Tensor],
                        windows: Sequence[tuple[torch.Tensor, np.ndarray]], threshold: float | None,
                        cfg: MAMLConfig, mpp: float) -> float:
    """The sigma (µm) of ``cfg.smoothing_um`` whose Gaussian smoothing of the two-class head's probabilities
    maximises the mIoU of the support ``windows`` (features ``(F, h, w)`` at ``mpp`` µm/px, labels ``(h, w)``)
    under the class decision at ``threshold`` (None: 0.5), if it beats no smoothing by ``cfg.smoothing_min_gain``
    (else 0); of equal scores the smallest sigma wins."""
    sigmas = sorted({float(v) for v in cfg.smoothing_um} | {0.0})
    if not windows or sigmas == [0.0]:
        return 0.0
    th = 0.5 if threshold is None else threshold
    counts = np.zeros((len(sigmas), 4))
    dev = next(iter(fast.values())).device
    with torch.no_grad():
        for feats, lab in windows:
            known = lab != IGNORE
            if not known.any():
                continue
            f = feats.float()
            logits = head_pixel_logits(head, fast, f.reshape(f.shape[0], -1).t().to(dev))
            fg = logits.softmax(1)[:, 1].reshape(1, 1, *f.shape[1:]).cpu()  # smoothing is linear: p0 = 1 - p1
            truth = lab[known].astype(bool)
            for i, s in enumerate(sigmas):
                pred = (gaussian_smooth(fg, s / mpp)[0, 0].numpy() >= th)[known]
                counts[i] += [(pred & truth).sum(), (pred | truth).sum(), (~pred & ~truth).sum(),
                              (~pred | ~truth).sum()]
    miou = (counts[:, 0] / np.maximum(counts[:, 1], 1) + counts[:, 2] / np.maximum(counts[:, 3], 1)) / 2
    best = int(np.argmax(miou))
    return sigmas[best] if miou[best] - miou[0] >= cfg.smoothing_min_gain else 0.0


def _learned_lrs(backbone: Backbone, init: dict, cfg: MAMLConfig) -> dict | None:
    """Meta-learned per-tensor step sizes (rescaled so that ``cfg.inner_lr`` sets their mean)."""
    if not (cfg.learn_inner_lr and backbone.inner_lrs):
        return None
    lrs = {k: v for k, v in backbone.inner_lrs.items() if k in init}
    mean = float(torch.stack(list(lrs.values())).mean())
    return {k: v * (cfg.inner_lr / mean) for k, v in lrs.items()}


def _adapt_full(backbone, sup, n_classes, start, cfg, devs, t0, balance) -> Generator[dict, None, dict]:
    """Inner loop over decoder (+head) or all parameters on fixed support crops, sharded over devices."""
    model = copy.deepcopy(backbone.model)
    model.add_head(TASK, n_classes)
    params = {k: v.detach() for k, v in model.named_parameters()}
    params.update({k: v.detach().clone() for k, v in start.items()})
    names = adapted_param_names(model, TASK, cfg.adapt, cfg.decoder_blocks)
    n_dec = len(model.backbone.decoders)
    frozen = max(0, n_dec - cfg.decoder_blocks) if cfg.adapt == "decoder" and cfg.decoder_blocks else 0
    crops = _support_crops(sup, size=256, per_image=max(1, 8 // len(sup)), seed=cfg.seed)
    ys = torch.from_numpy(np.stack([c[1] for c in crops]).astype(np.int64))
    w = balanced_weights(ys[ys != IGNORE], n_classes, balance)
    norm = float(w[ys[ys != IGNORE]].sum())
    cpu_only = all(d.type == "cpu" for d in devs)
    if cpu_only:  # shards side by side, one core each (faster than one shard on all cores: conv backward scales badly)
        devs = [devs[0]] * max(1, min(len(crops), cfg.cpu_shards or torch.get_num_threads()))
    parts = np.array_split(np.arange(len(crops)), len(devs))
    replicas = [model.to(devs[0])] + [copy.deepcopy(model).to(d) for d in devs[1:]]
    fns = []
    for dev, rep, idx in zip(devs, replicas, parts, strict=True):
        x = torch.from_numpy(np.stack([crops[i][0] for i in idx])).to(dev).permute(0, 3, 1, 2).float() / 255
        y = ys[idx].to(dev)
        enc = None
        if cfg.adapt == "decoder":  # the encoder is frozen: encode the support once, not at every step
            with torch.no_grad():
                enc = rep.backbone.encode(x)
                if frozen:  # and so are the deeper decoder blocks: decode them once too
                    enc = rep.backbone.decode_head_start(*enc, frozen)
        wd = w.to(dev)
        fns.append(lambda p, m=rep, x=x, y=y, w=wd, enc=enc: F.cross_entropy(
            functional_call(m, p, (None if enc is not None else x, TASK), {"encoded": enc})["seg"], y, weight=w,
            ignore_index=IGNORE, reduction="sum") / norm)
    concurrent = len(devs) > 1
    gen = inner_loop(fns, {k: v.to(devs[0]) for k, v in params.items()}, names, steps=cfg.steps, lr=cfg.inner_lr,
                     first_order=cfg.first_order, devices=devs, concurrent=concurrent,
                     shard_threads=1 if cpu_only else None)
    log.info("adapting %s on %s (%d shard%s%s)", cfg.adapt, ", ".join(map(str, dict.fromkeys(devs))), len(devs),
             "s" if len(devs) > 1 else "", ", side by side" if concurrent else "")
    fast = yield from relay(gen, lambda p: _progress(p, t0, "adapt"))
    return {k: fast[k] for k in names}


def _support_crops(sup, size: int, per_image: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed crops of ``size`` centred on random labelled pixels (padded with reflect / IGNORE)."""
    rng = np.random.default_rng(seed)
    out = []
    for im, lab in sup:
        pad = size // 2
        mode = "reflect" if min(im.shape[:2]) > pad else "edge"
        imp = np.pad(im, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
        labp = np.pad(lab, pad, constant_values=IGNORE)
        rr, cc = np.nonzero(lab != IGNORE)
        for k in rng.choice(len(rr), size=per_image, replace=len(rr) < per_image):
            r, c = rr[k], cc[k]
            out.append((imp[r:r + size, c:c + size], labp[r:r + size, c:c + size]))
    return out
