"""Readers for the paper's sources that are not in ../shared/data, in their official download layouts.

* ``gleason2019`` — MICCAI 2019 Gleason grading challenge (prostate TMA cores, up to 6 pathologists)::

      Train Imgs/<slide>_<core>.jpg                       e.g. slide001_core004.jpg (5120x5120 RGB)
      Maps1_T/<slide>_<core>_classimg_nonconvex.png       annotator 1's map (also accepted under mask/ or Maps/)
      ...
      Maps6_T/<slide>_<core>_classimg_nonconvex.png       annotator 6's map (not every core has all 6)

  Pixel values are Gleason codes, mapped to contiguous class ids (:data:`GLEASON_CODES`):

  ====  ================  ============================================================================
  code  class id / name   meaning
  ====  ================  ============================================================================
  0     0 background      not annotated (outside the core / not graded)
  1     1 benign          benign tissue
  3     2 gleason_3       Gleason pattern 3
  4     3 gleason_4       Gleason pattern 4
  5     4 gleason_5       Gleason pattern 5
  6     5 gleason_code_6  undocumented by the challenge; the MetaHistoSeg code keeps it as its own class
                          (``code6="separate"``, the default: 6 classes as in the paper); Foucart et al.
                          (SIPAIM 2021) remap "grades > 5" to benign (``code6="benign"``: 5 classes)
  ====  ================  ============================================================================

  Any other value raises ``ValueError`` naming the map. The available annotators' maps are consolidated per
  image with ``consolidation="staple"`` (SimpleITK ``MultiLabelSTAPLE``, :func:`.consolidate.staple_maps`;
  undecided pixels take annotator ``Maps<k>_T`` with the lowest k present — the authors' rule —, or become
  unknown with ``undecided="ignore"``) or ``"majority"`` (:func:`.consolidate.majority_vote_maps`; ties
  follow ``tie``: ``"first"`` = among the tied classes, the one of the lowest-numbered annotator who voted
  for one of them; ``"lowest"`` = lowest class id; ``"ignore"`` = unknown). Images without any map (the
  challenge's test images) are not listed.

* ``breastpathq`` — SPIE-AAPM-NCI BreastPathQ 2019, cell-centroid annotations (``datasets/cells``)::

      cells/<n>_crop.tif      RGB patch
      cells/<n>_key.xml       Sedeen XML: <graphic description="TIL-E"> ... <point>x,y</point> ...

  The reader accepts the ``datasets`` folder holding ``cells/`` or ``cells/`` itself. Each ``graphic``'s
  ``description`` names the cell type (:data:`BREASTPATHQ_TYPES`, compared without spaces and case-blind):
  TIL-E/TIL-S → lymphocyte (1), IDC/ILC/Muc C/DCIS 1-3/MC-E/MC-C/MC-M → malignant_epithelial (2),
  normal/UDH/ADH → normal_epithelial (3); graphics with other descriptions are skipped (counted in
  ``meta["skipped"]``), as the authors' code does. Points are ``x,y`` = (col, row) pixels; each becomes a
  filled circle (radius from :class:`~napari_metahistoseg.config.PointsConfig`, 12 px by default as in the
  paper) with the nearest-point rule of :func:`.points.points_to_masks`; pixels outside all circles are
  background (as in the paper's masks) unless ``background="unknown"``.

* ``digestpath`` — MICCAI 2019 DigestPath, colonoscopy tissue segmentation (task 2)::

      tissue-train-pos-v1/<name>.jpg          lesion-positive image
      tissue-train-pos-v1/<name>_mask.jpg     its lesion mask (JPEG: lesion where grey value >= 128)
      tissue-train-neg/<name>.jpg             lesion-free image: all background

  The paper used the 250 positive images only (``include_negative=False``).

Detection: these layouts are recognised by their official folder names, which the generic ``cpm15``
(``images/`` + ``instance_masks/``) and ``glas`` (``images/`` + ``masks/``) detectors do not look at; a
folder holding both (e.g. a Gleason download with someone's ``images/`` + ``masks/`` export beside it) must
open with the specific reader, so :func:`_detect_before` moves these readers ahead of ``cpm15``.

Resolutions (``mpp``) are nominal values from the data descriptions (Gleason2019: 40x scans, 0.25 µm/px;
BreastPathQ: 20x, 0.5 µm/px); DigestPath does not state one (``None``). Every ``open_*`` takes ``mpp=`` to
override.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

from ..config import PointsConfig
from .consolidate import TIE_RULES, UNDECIDED_RULES, majority_vote_maps, staple_maps
from .io import read_mask, read_rgb
from .points import points_to_masks, radius_in_pixels
from .readers import READERS, Reader, TaskDataset, _find, register_reader
from .task import Sample

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ Gleason2019

GLEASON_CODES = {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 5}
"""Gleason2019 pixel code → class id (``code6="separate"``)."""
GLEASON_CLASSES = ("background", "benign", "gleason_3", "gleason_4", "gleason_5", "gleason_code_6")
GLEASON_MPP = 0.25
GLEASON_IMAGE_DIRS = ("Train Imgs", "Train_imgs", "Train_Imgs")
GLEASON_MAP_PARENTS = (".", "mask", "Maps")
GLEASON_MAP_SUFFIX = "_classimg_nonconvex.png"
_MAPS_RE = re.compile(r"^Maps(\d+)_T$")


def gleason_classes(code6: str = "separate") -> tuple[dict[int, int], tuple[str, ...]]:
    """The code → class-id mapping and class names for ``code6`` ("separate" or "benign")."""
    if code6 == "separate":
        return dict(GLEASON_CODES), GLEASON_CLASSES
    if code6 == "benign":
        return {**GLEASON_CODES, 6: GLEASON_CODES[1]}, GLEASON_CLASSES[:-1]
    raise ValueError(f"code6 must be 'separate' or 'benign', got {code6!r}")


def _gleason_dirs(root: Path) -> tuple[Path, list[tuple[int, Path]]] | None:
    img_dir = next((root / d for d in GLEASON_IMAGE_DIRS if (root / d).is_dir()), None)
    if img_dir is None:
        return None
    for parent in GLEASON_MAP_PARENTS:
        base = root / parent
        if not base.is_dir():
            continue
        maps = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _MAPS_RE.match(p.name))]
        if maps:
            return img_dir, sorted(maps)
    return None


def _detect_gleason(root: Path) -> bool:
    return _gleason_dirs(root) is not None


def read_gleason_map(path: Path, lut: dict[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Read one annotator's code map and map codes to class ids (``(H, W) uint8``); unknown codes raise."""
    codes = read_mask(path, dtype=np.uint8, shape=shape)
    table = np.full(256, 255, np.uint8)
    for code, cls in lut.items():
        table[code] = cls
    bad = np.setdiff1d(np.unique(codes), list(lut))
    if bad.size:
        raise ValueError(f"{path}: unexpected Gleason code(s) {bad.tolist()} (expected {sorted(lut)})")
    return table[codes]


def _consolidate(maps: list[np.ndarray], n: int, consolidation: str, undecided: str, tie: str) -> np.ndarray:
    if consolidation == "staple":
        return staple_maps(maps, n, undecided=undecided)
    return majority_vote_maps(maps, n, tie=tie)


def _open_gleason(
    root: Path,
    *,
    consolidation: str = "staple",
    undecided: str = "first",
    tie: str = "first",
    code6: str = "separate",
    mpp: float | None = GLEASON_MPP,
    **_,
) -> TaskDataset:
    if consolidation not in ("staple", "majority"):
        raise ValueError(f"consolidation must be 'staple' or 'majority', got {consolidation!r}")
    if undecided not in UNDECIDED_RULES or tie not in TIE_RULES:
        raise ValueError(f"undecided must be one of {UNDECIDED_RULES} and tie one of {TIE_RULES}")
    lut, names = gleason_classes(code6)
    found = _gleason_dirs(root)
    if found is None:
        raise ValueError(f"{root}: not a Gleason2019 folder ('Train Imgs/' and 'Maps<k>_T/' folders)")
    img_dir, map_dirs = found
    stems = sorted(p.stem for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    ids = [s for s in stems if any((d / f"{s}{GLEASON_MAP_SUFFIX}").is_file() for _, d in map_dirs)]

    def load(sid: str) -> Sample:
        image = read_rgb(_find(img_dir, sid, (".jpg", ".jpeg", ".png")))
        present = [(k, d / f"{sid}{GLEASON_MAP_SUFFIX}") for k, d in map_dirs]
        present = [(k, p) for k, p in present if p.is_file()]
        if not present:
            raise ValueError(f"{img_dir / sid}: no annotator map '{sid}{GLEASON_MAP_SUFFIX}' in any Maps<k>_T")
        maps = [read_gleason_map(p, lut, image.shape[:2]) for _, p in present]
        semantic = _consolidate(maps, len(names), consolidation, undecided, tie)
        meta = {"annotators": [k for k, _ in present], "consolidation": consolidation}
        return Sample(image=image, task="gleason2019", sample_id=sid, class_names=names, semantic=semantic,
                      mpp=mpp, meta=meta)

    meta = {"annotator_dirs": [str(d) for _, d in map_dirs], "consolidation": consolidation, "code6": code6}
    return TaskDataset("gleason2019", root, "gleason2019", names, ids, load, mpp=mpp, meta=meta)


# ------------------------------------------------------------------------------------------ BreastPathQ

BREASTPATHQ_CLASSES = ("background", "lymphocyte", "malignant_epithelial", "normal_epithelial")
BREASTPATHQ_MPP = 0.5
BREASTPATHQ_TYPES = {
    **dict.fromkeys(("TIL-E", "TIL-S"), 1),
    **dict.fromkeys(("IDC", "ILC", "Muc C", "DCIS 1", "DCIS 2", "DCIS 3", "MC- E", "MC - C", "MC - M"), 2),
    **dict.fromkeys(("normal", "UDH", "ADH"), 3),
}
"""Sedeen ``description`` → class id (as grouped by the MetaHistoSeg authors' BreastPathQ preprocessing)."""


def _type_key(description: str) -> str:
    return re.sub(r"\s+", "", description).lower()


_TYPE_LOOKUP = {_type_key(k): v for k, v in BREASTPATHQ_TYPES.items()}


def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1].lower()


def read_breastpathq_xml(path: Path) -> tuple[np.ndarray, np.ndarray, Counter]:
    """Parse a BreastPathQ ``*_key.xml`` → ``(N, 2)`` (row, col) points, ``(N,)`` class ids, skipped types."""
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a valid XML file ({e})") from None
    pts, cls, skipped = [], [], Counter()
    for g in (el for el in tree.getroot().iter() if _tag(el) == "graphic"):
        desc = g.attrib.get("description", "")
        k = _TYPE_LOOKUP.get(_type_key(desc))
        points = [el for el in g.iter() if _tag(el) == "point"]
        if k is None:
            skipped[desc] += len(points)
            continue
        for p in points:
            try:
                x, y = (float(v) for v in (p.text or "").split(","))
            except ValueError:
                raise ValueError(f"{path}: point {p.text!r} of graphic {desc!r} is not 'x,y'") from None
            if not (np.isfinite(x) and np.isfinite(y)):
                raise ValueError(f"{path}: point {p.text!r} of graphic {desc!r} is not finite")
            pts.append((y, x))
            cls.append(k)
    return np.asarray(pts, np.float64).reshape(-1, 2), np.asarray(cls, np.int64), skipped


def _breastpathq_dir(root: Path) -> Path | None:
    for d in (root / "cells", root):
        if d.is_dir() and any(d.glob("*_key.xml")) and any(d.glob("*_crop.tif")):
            return d
    return None


def _detect_breastpathq(root: Path) -> bool:
    return _breastpathq_dir(root) is not None


def _natural_key(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _open_breastpathq(
    root: Path,
    *,
    points: PointsConfig | None = None,
    background: str = "background",
    margin: bool = False,
    mpp: float | None = BREASTPATHQ_MPP,
    **_,
) -> TaskDataset:
    cfg = points or PointsConfig()
    cells = _breastpathq_dir(root)
    if cells is None:
        raise ValueError(f"{root}: not a BreastPathQ folder (cells/ with *_crop.tif and *_key.xml)")
    radius = radius_in_pixels(cfg.radius, cfg.radius_unit, mpp)
    margin_px = cfg.background_margin_px if margin else 0.0
    ids = sorted((p.name[: -len("_crop.tif")] for p in cells.glob("*_crop.tif")), key=_natural_key)
    ids = [i for i in ids if (cells / f"{i}_key.xml").is_file()]

    def load(sid: str) -> Sample:
        image = read_rgb(cells / f"{sid}_crop.tif")
        xml = cells / f"{sid}_key.xml"
        pts, cls, skipped = read_breastpathq_xml(xml)
        h, w = image.shape[:2]
        if len(pts) and ((pts < 0).any() or (pts[:, 0] >= h).any() or (pts[:, 1] >= w).any()):
            raise ValueError(f"{xml}: points outside the {h}x{w} image {sid}_crop.tif")
        sem, inst = points_to_masks(pts, cls, (h, w), radius, background=background,
                                    background_margin_px=margin_px)
        if skipped:
            log.info("%s: skipped points of unknown cell types %s", xml, dict(skipped))
        return Sample(image=image, task="breastpathq", sample_id=sid, class_names=BREASTPATHQ_CLASSES,
                      semantic=sem, instances=inst, points=pts, point_classes=cls, mpp=mpp,
                      meta={"skipped": dict(skipped), "radius_px": radius})

    return TaskDataset("breastpathq", root, "breastpathq", BREASTPATHQ_CLASSES, ids, load, mpp=mpp, kind="points",
                       meta={"cells_dir": str(cells), "radius_px": radius})


# ------------------------------------------------------------------------------------------ DigestPath

DIGESTPATH_CLASSES = ("background", "lesion")
DIGESTPATH_POS_DIRS = ("tissue-train-pos-v1", "tissue-train-pos")
DIGESTPATH_NEG_DIR = "tissue-train-neg"
DIGESTPATH_MASK_THRESHOLD = 128  # JPEG masks: grey value >= 128 is lesion (the authors' code: > 127)


def _digestpath_dirs(root: Path) -> tuple[Path | None, Path | None]:
    pos = next((root / d for d in DIGESTPATH_POS_DIRS if (root / d).is_dir()), None)
    neg = root / DIGESTPATH_NEG_DIR
    return pos, (neg if neg.is_dir() else None)


def _detect_digestpath(root: Path) -> bool:
    return any(d is not None for d in _digestpath_dirs(root))


def _jpg_stems(folder: Path | None) -> tuple[set[str], set[str]]:
    """(image stems, mask stems without ``_mask``) of the JPEGs in ``folder``."""
    if folder is None:
        return set(), set()
    stems = {p.stem for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()}
    masks = {s[: -len("_mask")] for s in stems if s.endswith("_mask")}
    return {s for s in stems if not s.endswith("_mask")}, masks


def read_digestpath_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a DigestPath JPEG lesion mask → ``(H, W) uint8`` 0/1 (grey, or mean of RGB, >= 128)."""
    grey = read_rgb(path).astype(np.float32).mean(axis=2)
    if grey.shape != tuple(shape):
        raise ValueError(f"{path}: mask shape {grey.shape} does not match the image shape {tuple(shape)}")
    return (grey >= DIGESTPATH_MASK_THRESHOLD).astype(np.uint8)


def _open_digestpath(root: Path, *, include_negative: bool = True, mpp: float | None = None, **_) -> TaskDataset:
    pos_dir, neg_dir = _digestpath_dirs(root)
    pos_imgs, pos_masks = _jpg_stems(pos_dir)
    neg_imgs = _jpg_stems(neg_dir if include_negative else None)[0]
    where = {s: "pos" for s in pos_imgs | pos_masks}
    clash = sorted(set(where) & neg_imgs)
    if clash:
        raise ValueError(f"{root}: image name(s) {clash[:5]} in both the positive and the negative folder")
    where.update({s: "neg" for s in neg_imgs})

    def load(sid: str) -> Sample:
        split = where[sid]
        folder = pos_dir if split == "pos" else neg_dir
        image = read_rgb(_find(folder, sid, (".jpg", ".jpeg")))
        if split == "pos":
            semantic = read_digestpath_mask(_find(folder, f"{sid}_mask", (".jpg", ".jpeg")), image.shape[:2])
        else:
            semantic = np.zeros(image.shape[:2], np.uint8)
        return Sample(image=image, task="digestpath", sample_id=sid, class_names=DIGESTPATH_CLASSES,
                      semantic=semantic, mpp=mpp, meta={"split": split})

    ids = sorted(where, key=_natural_key)
    return TaskDataset("digestpath", root, "digestpath", DIGESTPATH_CLASSES, ids, load, mpp=mpp,
                       meta={"positive": sum(v == "pos" for v in where.values()),
                             "negative": sum(v == "neg" for v in where.values())})


# ------------------------------------------------------------------------------------------ registration


def _detect_before(names: tuple[str, ...], anchor: str) -> None:
    """Reorder :data:`READERS` in place so that ``names`` are tried just before ``anchor`` (detection order)."""
    items = list(READERS.items())
    moved = [(n, r) for n, r in items if n in names]
    rest = [(n, r) for n, r in items if n not in names]
    at = next((i for i, (n, _) in enumerate(rest) if n == anchor), len(rest))
    READERS.clear()
    READERS.update(rest[:at] + moved + rest[at:])


register_reader(Reader("gleason2019", _detect_gleason, _open_gleason,
                       "Gleason2019: 'Train Imgs' + Maps1_T..Maps6_T annotator maps (STAPLE / majority)"))
register_reader(Reader("breastpathq", _detect_breastpathq, _open_breastpathq,
                       "BreastPathQ cells: *_crop.tif + *_key.xml centroids → circles"))
register_reader(Reader("digestpath", _detect_digestpath, _open_digestpath,
                       "DigestPath 2019 tissue: tissue-train-pos-v1 (+ _mask.jpg), tissue-train-neg"))
# Specific official layouts before the generic image-folder readers (see the module docstring).
_detect_before(("gleason2019", "breastpathq", "digestpath"), "cpm15")
