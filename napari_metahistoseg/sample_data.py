"""napari sample-data contributions, returned as LayerDataTuples (no napari import here).

Layer conventions shared with the widgets (``napari_metahistoseg._qt.layers``): a layer made by the plugin
carries ``metadata[META] = {"kind": ..., "classes": [...], "colours": [...], ...}``. Kinds:

* ``"support"``  Labels: 0 = unknown (never background), class k painted as label k + 1;
* ``"truth"``    Labels: class ids (0 = the first class, usually background), for evaluation;
* ``"truth_instances"`` Labels: instance ids (0 = none);
* ``"prediction"``, ``"instances"``, ``"circles"``, ``"points"``, ``"mitosis"`` — made by the widgets.

Image layers carry ``metadata["mpp"]`` (µm per pixel) and, for generated images, ``metadata["seed"]``.
"""

from __future__ import annotations

import numpy as np

from .data.synthetic import synthetic_tile
from .data.task import IGNORE

META = "metahistoseg"
DEFAULT_CLASSES = ("background", "nucleus")
PALETTE = ("#8c8c8c", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#9a6324")
SYNTHETIC_SHAPE = (256, 256)
SYNTHETIC_MPP = 0.5  # µm per pixel of the synthetic tiles (the backbone's resolution)
DEMO_STROKE_RADIUS_PX = 2  # half-width of the demo's background brush strokes
DEMO_NUCLEI = 10  # nuclei filled in as the demo's nucleus strokes
DEMO_STROKES = 6  # background strokes


def class_colours(n: int) -> list[str]:
    """``n`` hex colours (class 0 grey); the palette repeats beyond its length."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def support_to_layer(support: np.ndarray) -> np.ndarray:
    """Support class ids ``(H, W) uint8`` (IGNORE = unknown) → layer values (0 = unknown, class k → k + 1)."""
    sup = np.asarray(support)
    out = sup.astype(np.int32) + 1
    out[sup == IGNORE] = 0
    return out.astype(np.uint8)


def labels_colormap(colours: list[str], *, offset: int) -> dict:
    """``{label: colour}`` for a Labels layer: class k shown as label k + ``offset``; label 0 transparent."""
    cmap: dict = {None: "transparent", 0: "transparent"}
    cmap.update({k + offset: c for k, c in enumerate(colours) if k + offset > 0})
    return cmap


def _image_meta(seed: int | None, mpp: float | None, source: str) -> dict:
    return {"seed": seed, "mpp": mpp, "source": source}


def synthetic_he(seed: int = 0) -> list[tuple]:
    """A seeded synthetic H&E tile (256x256 at 0.5 µm/px) with its exact truth: semantic classes and nuclei."""
    tile = synthetic_tile(SYNTHETIC_SHAPE, seed=seed, mpp=SYNTHETIC_MPP)
    classes = list(tile.class_names)
    colours = class_colours(len(classes))
    src = f"napari_metahistoseg.data.synthetic.synthetic_tile({SYNTHETIC_SHAPE}, seed={seed}, mpp={SYNTHETIC_MPP})"
    truth_meta = {META: {"kind": "truth", "classes": classes, "colours": colours}, "seed": seed}
    return [
        (tile.image, {"name": "synthetic H&E", "metadata": _image_meta(seed, SYNTHETIC_MPP, src), "rgb": True},
         "image"),
        (tile.semantic, {"name": "truth (classes)", "metadata": truth_meta, "opacity": 0.5, "visible": False,
                         "colormap": labels_colormap(colours, offset=0)}, "labels"),
        (tile.instances, {"name": "truth (nuclei)", "visible": False, "opacity": 0.5,
                          "metadata": {META: {"kind": "truth_instances"}, "seed": seed}}, "labels"),
    ]


def ihc_image() -> list[tuple]:
    """scikit-image's immunohistochemistry image (DAB + haematoxylin, 512x512, resolution unknown)."""
    from skimage import data

    src = "skimage.data.immunohistochemistry()"
    return [(data.immunohistochemistry(), {"name": "IHC (scikit-image)", "rgb": True,
                                           "metadata": _image_meta(None, None, src)}, "image")]


def demo_strokes(semantic: np.ndarray, instances: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """A few "brush strokes" consistent with the truth: ``DEMO_NUCLEI`` nuclei filled in as class 1 and
    ``DEMO_STROKES`` short background lines (class 0, kept only on true background). Returns support class ids
    ``(H, W) uint8`` with IGNORE elsewhere."""
    from scipy import ndimage as ndi
    from skimage.draw import line

    rng = np.random.default_rng(seed)
    h, w = semantic.shape
    support = np.full((h, w), IGNORE, np.uint8)
    ids = np.unique(instances[instances > 0])
    for i in rng.choice(ids, size=min(DEMO_NUCLEI, ids.size), replace=False) if ids.size else []:
        support[instances == i] = 1
    stroke = np.zeros((h, w), bool)
    for _ in range(DEMO_STROKES):
        r0, c0 = rng.integers(8, [h - 8, w - 8])
        ang, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3) * min(h, w)
        r1 = int(np.clip(r0 + length * np.sin(ang), 0, h - 1))
        c1 = int(np.clip(c0 + length * np.cos(ang), 0, w - 1))
        rr, cc = line(int(r0), int(c0), r1, c1)
        stroke[rr, cc] = True
    stroke = ndi.binary_dilation(stroke, iterations=DEMO_STROKE_RADIUS_PX)
    near_nucleus = ndi.binary_dilation(semantic > 0, iterations=2)
    support[stroke & ~near_nucleus] = 0
    return support


def demo_session(seed: int = 0) -> list[tuple]:
    """A synthetic tile plus a support layer with a few background and nucleus strokes: press Adapt."""
    tile = synthetic_tile(SYNTHETIC_SHAPE, seed=seed, mpp=SYNTHETIC_MPP)
    classes = list(DEFAULT_CLASSES)
    colours = class_colours(len(classes))
    support = demo_strokes(tile.semantic, tile.instances, seed=seed)
    src = f"napari_metahistoseg.data.synthetic.synthetic_tile({SYNTHETIC_SHAPE}, seed={seed}, mpp={SYNTHETIC_MPP})"
    meta = {META: {"kind": "support", "classes": classes, "colours": colours, "group": f"demo-{seed}",
                   "image": "demo H&E"}, "seed": seed}
    return [
        (tile.image, {"name": "demo H&E", "metadata": _image_meta(seed, SYNTHETIC_MPP, src), "rgb": True},
         "image"),
        (support_to_layer(support), {"name": "support", "metadata": meta, "opacity": 0.7,
                                     "colormap": labels_colormap(colours, offset=1)}, "labels"),
    ]
