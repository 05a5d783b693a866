"""Read annotation files for the support (no Qt): label masks, points CSV, Aperio/MoNuSeg XML.

Every error is a ``ValueError`` naming the file; nothing is changed in the viewer until a file has been read
completely, so a corrupt file never costs an annotation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.io import read_mask, read_points_csv
from ..data.sources import parse_aperio_xml
from ..data.task import IGNORE
from ..slide import labelled_box
from .layers import support_to_layer

MASK_SUFFIXES = (".png", ".tif", ".tiff")
XML_CLASS = 1  # class given to the polygons of an Aperio/MoNuSeg XML (the first non-background class)


@dataclass
class Imported:
    """What a file contributed: support class ids (IGNORE = unknown) and/or points with class ids."""

    support: np.ndarray | None = None
    points: np.ndarray | None = None
    point_classes: np.ndarray | None = None

    def summary(self) -> str:
        parts = []
        if self.support is not None:
            parts.append(f"{int((self.support != IGNORE).sum())} labelled pixels")
        if self.points is not None:
            parts.append(f"{len(self.points)} points")
        return ", ".join(parts) or "nothing"


def read_annotations(path: str | Path, shape: tuple[int, int], n_classes: int) -> Imported:
    """A mask (``.png``/``.tif``: class ids, 255 = unknown), points (``.csv``: row,col[,class]) or an Aperio XML
    (polygons become class ``XML_CLASS``, the rest stays unknown) for an image of ``shape``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MASK_SUFFIXES:
        mask = read_mask(path, dtype=np.uint32, shape=shape)
        bad = sorted({int(v) for v in np.unique(mask) if v != IGNORE and v >= n_classes})
        if bad:
            raise ValueError(f"{path}: mask has class ids {bad[:5]} but only {n_classes} classes are named "
                             f"(0..{n_classes - 1}, {IGNORE} = unknown)")
        return Imported(support=mask.astype(np.uint8))
    if suffix == ".csv":
        pts, cls = read_points_csv(path, shape=shape)
        if len(cls) and cls.max() >= n_classes:
            raise ValueError(f"{path}: point class {int(cls.max())} but only {n_classes} classes are named")
        return Imported(points=pts, point_classes=cls)
    if suffix == ".xml":
        if n_classes <= XML_CLASS:
            raise ValueError(f"{path}: XML polygons need a class {XML_CLASS}; name at least 2 classes")
        inst, _ = parse_aperio_xml(path, shape)
        if not inst.any():
            raise ValueError(f"{path}: no polygon with at least 3 vertices inside the image")
        support = np.full(shape, IGNORE, np.uint8)
        support[inst > 0] = XML_CLASS
        return Imported(support=support)
    raise ValueError(f"{path}: unsupported annotation file (masks .png/.tif, points .csv, Aperio/MoNuSeg .xml)")


def merge_support(layer_values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Support layer values with the imported labelled pixels written over them (unknown pixels keep theirs)."""
    out = np.array(layer_values, copy=True)
    if out.shape != support.shape:
        raise ValueError(f"imported labels {support.shape} do not match the support layer {out.shape}")
    keep = support != IGNORE
    out[keep] = support_to_layer(support)[keep]
    return out


def crop_to_region(support: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """The part of an image-sized imported ``support`` inside the region of ``shape`` at image pixel ``origin``;
    ValueError if labelled pixels lie outside it (they would be lost)."""
    r0, c0 = origin
    r1, c1 = r0 + shape[0], c0 + shape[1]
    box = labelled_box(support, IGNORE)
    if box is not None and (box[0] < r0 or box[1] > r1 or box[2] < c0 or box[3] > c1):
        raise ValueError(f"the imported labels span rows {box[0]}-{box[1]}, columns {box[2]}-{box[3]}, beyond the "
                         f"support region (rows {r0}-{r1}, columns {c0}-{c1}), which would lose them: import a crop, "
                         "or import into an image without a support layer (a new region is made around them)")
    return support[r0:r1, c0:c1]
