"""The unified task format: one in-memory representation for every data source.

A :class:`Sample` is one image of one task with whatever ground truth its source has:

* ``image``      ``(H, W, 3) uint8`` RGB
* ``semantic``   ``(H, W) uint8`` class ids, :data:`IGNORE` (255) where unlabelled ("unknown")
* ``instances``  ``(H, W) uint32`` instance ids (0 = none), optional
* ``points``     ``(N, 2) float64`` (row, col) pixel coordinates, optional
* ``point_classes`` ``(N,) int64`` class id per point, optional
* ``patch_label`` ``int`` class of the whole patch (patch-classification tasks), optional

plus ``class_names`` (index = class id), ``mpp`` (microns per pixel, ``None`` if unknown), ``task`` (the
task/source name) and ``sample_id`` (the file stem).

The on-disk form (:func:`save_unified` / :func:`load_unified`) is a folder::

    task.json                   {"format": "metahistoseg-task", "version": 1, "task", "class_names", "mpp",
                                 "samples": [{"id", "has_semantic", "has_instances", "has_points", "patch_label",
                                              "mpp"}]}   (a sample's "mpp" overrides the task's)
    images/<id>.png             RGB uint8
    semantic/<id>.png           uint8, 255 = unknown
    instances/<id>.tif          uint32
    points/<id>.csv             header ``row,col,class``

Saving is crash-safe: every file is written to a hidden temporary file in its folder and renamed over the old
one, and ``task.json`` is replaced last, so a process killed mid-save leaves a folder that still loads (each file
either its previous or its new complete version; samples new in this save are listed only once it finishes).
Sample ids are file stems: no path separators, no leading dot.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

IGNORE = 255
"""Semantic value of unlabelled ("unknown") pixels. Losses and metrics skip it; it is never background."""

FORMAT_NAME = "metahistoseg-task"
FORMAT_VERSION = 1


@dataclass
class Sample:
    """One image of one task in the unified format (see module docstring for shapes)."""

    image: np.ndarray
    task: str
    sample_id: str
    class_names: tuple[str, ...] = ("background", "foreground")
    semantic: np.ndarray | None = None
    instances: np.ndarray | None = None
    points: np.ndarray | None = None
    point_classes: np.ndarray | None = None
    patch_label: int | None = None
    mpp: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the sample if any array has the wrong shape/dtype/values."""
        where = f"sample {self.task}/{self.sample_id}"
        im = self.image
        if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            raise ValueError(
                f"{where}: image must be (H, W, 3) uint8, got "
                f"{getattr(im, 'shape', None)} {getattr(im, 'dtype', type(im).__name__)}"
            )
        if im.shape[0] == 0 or im.shape[1] == 0:
            raise ValueError(f"{where}: image is empty ({im.shape[0]}x{im.shape[1]})")
        hw = im.shape[:2]
        if self.semantic is not None:
            if self.semantic.shape != hw:
                raise ValueError(f"{where}: semantic mask shape {self.semantic.shape} != image shape {hw}")
            if self.semantic.dtype != np.uint8:
                raise ValueError(f"{where}: semantic mask must be uint8, got {self.semantic.dtype}")
            bad = np.setdiff1d(np.unique(self.semantic), np.r_[np.arange(self.n_classes), IGNORE])
            if bad.size:
                raise ValueError(
                    f"{where}: semantic mask has class ids {bad.tolist()} outside 0..{self.n_classes - 1} "
                    f"(and {IGNORE} = unknown)"
                )
        if self.instances is not None:
            if self.instances.shape != hw:
                raise ValueError(f"{where}: instance map shape {self.instances.shape} != image shape {hw}")
            if self.instances.dtype != np.uint32:
                raise ValueError(f"{where}: instance map must be uint32, got {self.instances.dtype}")
        if self.points is not None:
            pts = self.points
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise ValueError(f"{where}: points must be (N, 2) (row, col), got {pts.shape}")
            if not np.all(np.isfinite(pts)):
                raise ValueError(f"{where}: points contain NaN or inf")
            if self.point_classes is not None and self.point_classes.shape != (pts.shape[0],):
                raise ValueError(f"{where}: {self.point_classes.shape[0]} point classes for {pts.shape[0]} points")

    def with_(self, **changes) -> Sample:
        """A copy with some fields replaced (validated)."""
        return replace(self, **changes)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # never leave a half-written temp file behind
        raise


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` (same suffix, so writers pick the same format); on success
    rename it over ``path`` atomically, on failure remove it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_sample_id(sample_id: object, where: str) -> str:
    """``sample_id`` if it can be a file stem inside the task folder, else ``ValueError`` naming ``where``."""
    if (not isinstance(sample_id, str) or not sample_id.strip() or sample_id.startswith(".")
            or any(c in sample_id for c in "/\\\0") or sample_id != sample_id.strip()):
        raise ValueError(f"{where}: sample id {sample_id!r} is not a valid file name (no path separators, no "
                         "leading dot or surrounding spaces)")
    return sample_id


def save_unified(samples: list[Sample], folder: str | os.PathLike) -> Path:
    """Write samples of one task to ``folder`` in the on-disk unified format. Returns the folder."""
    import tifffile
    from skimage import io as skio

    if not samples:
        raise ValueError(f"{folder}: nothing to save (no samples)")
    folder = Path(folder)
    tasks = {s.task for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"{folder}: samples of several tasks {sorted(tasks)}; save one task per folder")
    if len({tuple(s.class_names) for s in samples}) != 1:
        raise ValueError(f"{folder}: samples of task {samples[0].task!r} have different class_names")
    ids = [check_sample_id(s.sample_id, str(folder)) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{folder}: duplicate sample ids {sorted({i for i in ids if ids.count(i) > 1})}")
    for sub in ("images", "semantic", "instances", "points"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for s in samples:
        with _atomic_target(folder / "images" / f"{s.sample_id}.png") as tmp:
            skio.imsave(tmp, s.image, check_contrast=False)
        if s.semantic is not None:
            with _atomic_target(folder / "semantic" / f"{s.sample_id}.png") as tmp:
                skio.imsave(tmp, s.semantic, check_contrast=False)
        if s.instances is not None:
            with _atomic_target(folder / "instances" / f"{s.sample_id}.tif") as tmp:
                tifffile.imwrite(tmp, s.instances, compression="zlib")
        if s.points is not None:
            cls = s.point_classes if s.point_classes is not None else np.ones(len(s.points), np.int64)
            with _atomic_target(folder / "points" / f"{s.sample_id}.csv") as tmp, open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["row", "col", "class"])
                for (r, c), k in zip(s.points, cls, strict=True):
                    w.writerow([f"{r:.3f}", f"{c:.3f}", int(k)])
        entries.append(
            {
                "id": s.sample_id,
                "has_semantic": s.semantic is not None,
                "has_instances": s.instances is not None,
                "has_points": s.points is not None,
                "patch_label": s.patch_label,
                "mpp": s.mpp,  # per sample: sources such as CPM-15 mix magnifications
            }
        )
    desc = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "task": samples[0].task,
        "class_names": list(samples[0].class_names),
        "mpp": samples[0].mpp,
        "samples": entries,
    }
    _atomic_write_text(folder / "task.json", json.dumps(desc, indent=2))
    return folder


def read_unified_description(folder: str | os.PathLike) -> dict:
    """Read and validate ``task.json`` of a unified folder."""
    path = Path(folder) / "task.json"
    try:
        desc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (not a unified task folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(desc, dict) or desc.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: 'format' must be {FORMAT_NAME!r}")
    for key, typ in (("task", str), ("class_names", list), ("samples", list)):
        if not isinstance(desc.get(key), typ):
            raise ValueError(f"{path}: field {key!r} missing or not a {typ.__name__}")
    for e in desc["samples"]:
        if not isinstance(e, dict) or not isinstance(e.get("id"), str):
            raise ValueError(f"{path}: every sample entry needs a string 'id'")
        check_sample_id(e["id"], str(path))
    names = desc["class_names"]
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: 'class_names' must be a non-empty list of strings")
    _check_mpp(desc.get("mpp"), f"{path}: 'mpp'")
    for e in desc["samples"]:
        _check_mpp(e.get("mpp"), f"{path}: sample {e['id']!r} 'mpp'")
        label = e.get("patch_label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool)
                                  or not 0 <= label < len(names)):
            raise ValueError(f"{path}: sample {e['id']!r} 'patch_label' must be null or a class id in "
                             f"0..{len(names) - 1}, got {label!r}")
    return desc


def _check_mpp(value: object, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be null or a number > 0 (µm per pixel), got {value!r}")


def load_unified_sample(folder: str | os.PathLike, entry: dict, desc: dict) -> Sample:
    """Load one sample described by ``entry`` of ``task.json``."""
    from .io import read_mask, read_points_csv, read_rgb

    folder = Path(folder)
    sid = entry["id"]
    image = read_rgb(folder / "images" / f"{sid}.png")
    semantic = instances = points = pclasses = None
    if entry.get("has_semantic"):
        semantic = read_mask(folder / "semantic" / f"{sid}.png", dtype=np.uint8, shape=image.shape[:2])
    if entry.get("has_instances"):
        instances = read_mask(folder / "instances" / f"{sid}.tif", dtype=np.uint32, shape=image.shape[:2])
    if entry.get("has_points"):
        points, pclasses = read_points_csv(folder / "points" / f"{sid}.csv", shape=image.shape[:2])
    return Sample(
        image=image,
        task=desc["task"],
        sample_id=sid,
        class_names=tuple(desc["class_names"]),
        semantic=semantic,
        instances=instances,
        points=points,
        point_classes=pclasses,
        patch_label=entry.get("patch_label"),
        mpp=entry.get("mpp", desc.get("mpp")),
    )
