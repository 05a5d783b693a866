"""Readers for the data sources of ../shared/data and of our own unified folder format.

Each ``open_*`` returns a :class:`~.readers.TaskDataset`; each ``detect_*`` recognises the folder layout.
Other sources (Gleason2019, BreastPathQ, DigestPath) live in :mod:`.sources_extra`.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .io import read_mask, read_rgb
from .points import points_to_masks
from .readers import IMG_EXTS, Reader, TaskDataset, _find, _stems, register_reader, relabel_sequential
from .task import Sample, load_unified_sample, read_unified_description

NUCLEI_CLASSES = ("background", "nucleus")

# ------------------------------------------------------------------------------------------ unified


def _detect_unified(root: Path) -> bool:
    return (root / "task.json").is_file()


def _open_unified(root: Path, **_) -> TaskDataset:
    desc = read_unified_description(root)
    entries = {e["id"]: e for e in desc["samples"]}
    kind = "patches" if any(e.get("patch_label") is not None for e in entries.values()) else (
        "points" if any(e.get("has_points") for e in entries.values()) else "segmentation"
    )
    return TaskDataset(
        layout="unified", root=root, task=desc["task"], class_names=tuple(desc["class_names"]),
        ids=list(entries), loader=lambda i: load_unified_sample(root, entries[i], desc), mpp=desc.get("mpp"),
        kind=kind,
    )


register_reader(Reader("unified", _detect_unified, _open_unified, "our own folder format (task.json)"))

# ------------------------------------------------------------------------------------------ MoNuSeg


def parse_aperio_xml(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Rasterise an Aperio ImageScope XML (one ``<Region>`` per nucleus) to a uint32 instance map.

    Pixels whose centres fall inside a polygon (``skimage.draw.polygon(rows=Y, cols=X)``) get the region's
    1-based index in file order; later regions overwrite earlier ones where they overlap. Returns the map and
    the XML's ``MicronsPerPixel`` (``None`` if absent).
    """
    from skimage.draw import polygon

    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a valid Aperio XML file ({e})") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    root = tree.getroot()
    mpp = root.attrib.get("MicronsPerPixel")
    inst = np.zeros(shape, np.uint32)
    k = 0
    for region in root.iter("Region"):
        verts = region.findall("./Vertices/Vertex")
        if len(verts) < 3:
            continue
        try:
            xs = np.array([float(v.attrib["X"]) for v in verts])
            ys = np.array([float(v.attrib["Y"]) for v in verts])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: region {region.attrib.get('Id')} has a vertex without numeric X/Y") from None
        k += 1
        rr, cc = polygon(ys, xs, shape=shape)
        inst[rr, cc] = k
    return inst, (float(mpp) if mpp else None)


def _monuseg_dirs(root: Path) -> tuple[Path, Path] | None:
    for img, ann in (("images", "annotations"), ("Tissue Images", "Annotations"), ("Tissue_Images", "Annotations")):
        if (root / img).is_dir() and (root / ann).is_dir() and any((root / ann).glob("*.xml")):
            return root / img, root / ann
    return None


def _detect_monuseg(root: Path) -> bool:
    return _monuseg_dirs(root) is not None


def _open_monuseg(root: Path, *, use_xml: bool = True, **_) -> TaskDataset:
    img_dir, ann_dir = _monuseg_dirs(root)  # type: ignore[misc]
    ids = [s for s in _stems(img_dir, (".tif", ".tiff", ".png")) if (ann_dir / f"{s}.xml").exists()]
    mask_dir = root / "instance_masks"

    def load(sid: str) -> Sample:
        image = read_rgb(_find(img_dir, sid, (".tif", ".tiff", ".png")))
        xml_inst, mpp = parse_aperio_xml(ann_dir / f"{sid}.xml", image.shape[:2])
        if not use_xml and (mask_dir / f"{sid}.png").exists():
            inst = read_mask(mask_dir / f"{sid}.png", shape=image.shape[:2])
        else:
            inst = xml_inst
        inst = relabel_sequential(inst)
        return Sample(image=image, task="monuseg", sample_id=sid, class_names=NUCLEI_CLASSES,
                      semantic=(inst > 0).astype(np.uint8), instances=inst, mpp=mpp or 0.25)

    return TaskDataset("monuseg", root, "monuseg", NUCLEI_CLASSES, ids, load, mpp=0.25)


register_reader(Reader("monuseg", _detect_monuseg, _open_monuseg, "MoNuSeg: TIFF tiles + Aperio XML polygons"))

# ------------------------------------------------------------------------------------------ CoNSeP tiles

CONSEP_CLASSES = ("background", "other", "inflammatory", "epithelial", "spindle")


def _detect_consep(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "instance_masks").is_dir() and (root / "class_masks").is_dir()


def _open_consep(root: Path, **_) -> TaskDataset:
    ids = [s for s in _stems(root / "images", IMG_EXTS) if (root / "instance_masks" / f"{s}.png").exists()]

    def load(sid: str) -> Sample:
        image = read_rgb(_find(root / "images", sid, IMG_EXTS))
        inst = relabel_sequential(read_mask(root / "instance_masks" / f"{sid}.png", shape=image.shape[:2]))
        types = read_mask(root / "class_masks" / f"{sid}.png", dtype=np.uint8, shape=image.shape[:2])
        if types.max() >= len(CONSEP_CLASSES):
            raise ValueError(f"{root / 'class_masks' / (sid + '.png')}: type {types.max()} > 4")
        return Sample(image=image, task="consep", sample_id=sid, class_names=CONSEP_CLASSES, semantic=types,
                      instances=inst, mpp=0.25)

    return TaskDataset("consep_tiles", root, "consep", CONSEP_CLASSES, ids, load, mpp=0.25)


register_reader(Reader("consep_tiles", _detect_consep, _open_consep, "CoNSeP tiles: instances + 4 nuclear types"))

# ------------------------------------------------------------------------------------------ CPM-15

CPM15_MAG = {f"image{i:02d}": (20 if i <= 7 else 40) for i in range(1, 16)}


def _detect_cpm15(root: Path) -> bool:
    return (
        (root / "images").is_dir()
        and (root / "instance_masks").is_dir()
        and not (root / "class_masks").is_dir()
        and not (root / "annotations").is_dir()
    )


def _open_cpm15(root: Path, **_) -> TaskDataset:
    ids = [s for s in _stems(root / "images", IMG_EXTS) if (root / "instance_masks" / f"{s}.png").exists()]

    def load(sid: str) -> Sample:
        image = read_rgb(_find(root / "images", sid, IMG_EXTS))
        inst = relabel_sequential(read_mask(root / "instance_masks" / f"{sid}.png", shape=image.shape[:2]))
        mpp = 0.5 if CPM15_MAG.get(sid, 40) == 20 else 0.25
        return Sample(image=image, task="cpm15", sample_id=sid, class_names=NUCLEI_CLASSES,
                      semantic=(inst > 0).astype(np.uint8), instances=inst, mpp=mpp)

    return TaskDataset("cpm15", root, "cpm15", NUCLEI_CLASSES, ids, load, mpp=None)


register_reader(Reader("cpm15", _detect_cpm15, _open_cpm15, "CPM-15 / generic images + instance_masks"))

# ------------------------------------------------------------------------------------------ GlaS

GLAS_CLASSES = ("background", "gland")


def _detect_glas(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _read_glas_grades(root: Path) -> dict[str, dict]:
    path = root / "Grade.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for r in rows:
        r = {k.strip().lower(): (v or "").strip() for k, v in r.items() if k}
        name = r.get("name") or r.get("image name")
        if name:
            out[name] = r
    return out


def _open_glas(root: Path, **_) -> TaskDataset:
    mask_stems = set(_stems(root / "masks", (".png", ".bmp", ".tif")))
    ids = [s for s in _stems(root / "images", IMG_EXTS) if s in mask_stems]
    grades = _read_glas_grades(root)

    def load(sid: str) -> Sample:
        image = read_rgb(_find(root / "images", sid, IMG_EXTS))
        mpath = _find(root / "masks", sid, (".png", ".bmp", ".tif"))
        m = read_mask(mpath, shape=image.shape[:2])
        semantic = (m > 0).astype(np.uint8)
        inst = m.astype(np.uint32) if m.max() > 1 and len(np.unique(m)) > 2 else ndi.label(semantic)[0]
        return Sample(image=image, task="glas", sample_id=sid, class_names=GLAS_CLASSES, semantic=semantic,
                      instances=relabel_sequential(inst), mpp=0.62, meta={"grade": grades.get(sid, {})})

    return TaskDataset("glas", root, "glas", GLAS_CLASSES, ids, load, mpp=0.62, meta={"grades": grades})


register_reader(Reader("glas", _detect_glas, _open_glas, "GlaS: images + binary gland masks (+ Grade.csv)"))

# ------------------------------------------------------------------------------------------ BM-Graz

CELL_CLASSES = ("background", "cell")


def read_graz_points(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a BM-Graz point file (first line ``N 3 0``, then ``x y code``) → (row, col) points, codes."""
    try:
        lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not lines:
        raise ValueError(f"{path}: empty point file")
    try:
        n = int(lines[0][0])
        xy = np.array([[float(v) for v in ln[:3]] for ln in lines[1:]], np.float64).reshape(-1, 3)
    except (ValueError, IndexError):
        raise ValueError(f"{path}: malformed point file (expected 'N 3 0' then 'x y code' lines)") from None
    if len(xy) != n:
        raise ValueError(f"{path}: header says {n} points but {len(xy)} lines follow (truncated?)")
    return xy[:, [1, 0]], xy[:, 2].astype(np.int64)


def _detect_graz(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "points").is_dir() and any((root / "points").glob("*.txt"))


def _open_graz(root: Path, *, radius_px: float = 12.0, background: str = "background", **_) -> TaskDataset:
    ids = [s for s in _stems(root / "images", IMG_EXTS) if (root / "points" / f"{s}.txt").exists()]

    def load(sid: str) -> Sample:
        image = read_rgb(_find(root / "images", sid, IMG_EXTS))
        pts, codes = read_graz_points(root / "points" / f"{sid}.txt")
        h, w = image.shape[:2]
        if len(pts) and ((pts < 0).any() or (pts[:, 0] >= h).any() or (pts[:, 1] >= w).any()):
            raise ValueError(f"{root / 'points' / (sid + '.txt')}: points outside the {h}x{w} image")
        sem, inst = points_to_masks(pts, None, (h, w), radius_px, background=background)
        return Sample(image=image, task="bm_graz_cells", sample_id=sid, class_names=CELL_CLASSES, semantic=sem,
                      instances=inst, points=pts, point_classes=np.ones(len(pts), np.int64), mpp=None,
                      meta={"codes": codes})

    return TaskDataset("bm_graz_cells", root, "bm_graz_cells", CELL_CLASSES, ids, load, kind="points")


register_reader(Reader("bm_graz_cells", _detect_graz, _open_graz, "BM-Graz: images + x y code point files"))

# ------------------------------------------------------------------------------------------ AMi-Br

MITOSIS_CLASSES = ("normal", "atypical")


def _detect_amibr(root: Path) -> bool:
    return (root / "labels.csv").is_file() and (root / "patches").is_dir()


def _truthy(v: str) -> bool:
    return str(v).strip().lower() in ("true", "1", "yes", "atypical")


def _open_amibr(root: Path, **_) -> TaskDataset:
    from .consolidate import vote_labels

    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "patch" not in rows[0]:
        raise ValueError(f"{root / 'labels.csv'}: needs a 'patch' column")
    experts = sorted(k for k in rows[0] if k.startswith("expert") and k.endswith("_atypical"))
    votes = np.array([[int(_truthy(r[k])) for k in experts] for r in rows], np.int64)
    labels, agreement = vote_labels(votes, n_classes=2, tie="first")
    by_id = {}
    for r, lab, agr, v in zip(rows, labels, agreement, votes, strict=True):
        sid = Path(r["patch"]).stem
        by_id[sid] = (r, int(lab), float(agr), v.tolist())

    def load(sid: str) -> Sample:
        r, lab, agr, v = by_id[sid]
        image = read_rgb(root / r["patch"])
        return Sample(image=image, task="amibr_mitosis", sample_id=sid, class_names=MITOSIS_CLASSES,
                      patch_label=lab, mpp=0.25,
                      meta={"votes": v, "agreement": agr, "dataset": r.get("dataset"), "slide": r.get("slide")})

    return TaskDataset("amibr_mitosis", root, "amibr_mitosis", MITOSIS_CLASSES, sorted(by_id), load, mpp=0.25,
                       kind="patches", meta={"experts": experts})


register_reader(Reader("amibr_mitosis", _detect_amibr, _open_amibr, "AMi-Br: mitotic figure patches + 3 votes"))
