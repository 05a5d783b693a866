"""Autosaved annotation sessions (no Qt): support labels, centroid points and the adapted head of one image.

A session lives in ``<root>/<fingerprint>/`` where the fingerprint identifies the image (SHA-256 of a
downsampled copy, or of a few blocks of a lazy slide, plus its shape, see :func:`image_fingerprint`), so
re-opening the same image finds its work again whatever the file is called. The default root is
``~/.napari-metahistoseg/sessions`` (or ``$METAHISTOSEG_SESSIONS``). Folder contents::

    session.json              {"format": "metahistoseg-session", "version": 1, "fingerprint", "shape",
                               "image_name", "classes", "colours", "mpp", "saved": {part: ISO time}}
    support.png | support.tif (H, W) uint8 class ids, 255 = unknown (TIFF above PNG_MAX_PIXELS)
    points.csv                header ``row,col,class`` (class ids of the task)
    head.mhshead.json/.safetensors   the adapted head (:meth:`AdaptedHead.save`)

Every file is written atomically (a temporary file in the same folder, then ``os.replace``), so a crash while
saving leaves the previous version intact.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .data.io import read_mask, read_points_csv
from .data.task import IGNORE

log = logging.getLogger(__name__)

SESSIONS_ENV = "METAHISTOSEG_SESSIONS"
SESSION_FORMAT = "metahistoseg-session"
FORMAT_VERSION = 1
FINGERPRINT_SIDE_PX = 256  # the image is strided down to at most this many pixels per side before hashing
FINGERPRINT_MAX_CHUNKS = 16  # lazy images whose strided copy would read more chunks are hashed by blocks
FINGERPRINT_BLOCK_AT = (0.2, 0.5, 0.8)  # lazy images: blocks at these fractions of the height and the width
FINGERPRINT_BLOCK_PX = 256  # side of each block at most (within one chunk); the grid of chunk-less lazy arrays
FINGERPRINT_CHARS = 20  # hex characters of the SHA-256 kept as the folder name (80 bits)
PNG_MAX_PIXELS = 64_000_000  # larger support masks are written as zlib-compressed TIFF
HEAD_STEM = "head"


def default_root() -> Path:
    """``$METAHISTOSEG_SESSIONS`` if set, else ``~/.napari-metahistoseg/sessions``."""
    env = os.environ.get(SESSIONS_ENV)
    return Path(env).expanduser() if env else Path.home() / ".napari-metahistoseg" / "sessions"


def image_fingerprint(image: Any, *, side_px: int = FINGERPRINT_SIDE_PX) -> str:
    """Hex fingerprint of ``image (H, W[, C])``: SHA-256 of its shape, dtype and a sample of its pixels.

    The sample is a strided copy of at most ``side_px`` pixels per side, unless ``image`` is lazy (zarr, dask:
    anything with ``chunks`` or that is not a numpy array) and that copy would touch more than
    :data:`FINGERPRINT_MAX_CHUNKS` chunks (a slide: it would read and decode every chunk). Then the sample is
    the chunk-aligned blocks at :data:`FINGERPRINT_BLOCK_AT` of the height and width (at most
    :data:`FINGERPRINT_BLOCK_PX` per side, each inside one chunk and read with one slicing call), so at most 9
    chunks are read whatever the slide's size."""
    shape = tuple(int(s) for s in image.shape)
    if len(shape) < 2 or 0 in shape[:2]:
        raise ValueError(f"image_fingerprint: expected a non-empty (H, W[, C]) image, got shape {shape}")
    step = [max(1, -(-s // side_px)) for s in shape[:2]]
    h = hashlib.sha256()
    starts = None if isinstance(image, np.ndarray) and not hasattr(image, "chunks") else _chunk_starts(image, shape)
    if starts is not None and _chunks_touched(starts, shape, step) > FINGERPRINT_MAX_CHUNKS:
        boxes = list(dict.fromkeys((r0, r1, c0, c1) for r0, r1 in _block_spans(starts[0], shape[0])
                                   for c0, c1 in _block_spans(starts[1], shape[1])))
        blocks = [np.ascontiguousarray(np.asarray(image[r0:r1, c0:c1])) for r0, r1, c0, c1 in boxes]
        h.update(json.dumps({"shape": shape, "dtype": str(blocks[0].dtype), "blocks": boxes}).encode())
        for block in blocks:
            h.update(block.tobytes())
        return h.hexdigest()[:FINGERPRINT_CHARS]
    small = np.ascontiguousarray(np.asarray(image[:: step[0], :: step[1]]))
    h.update(json.dumps({"shape": shape, "dtype": str(small.dtype)}).encode())
    h.update(small.tobytes())
    return h.hexdigest()[:FINGERPRINT_CHARS]


def _chunk_starts(image: Any, shape: tuple[int, ...]) -> list[np.ndarray]:
    """First row and first column of every chunk of a lazy ``image``: from ``chunks`` (zarr: sizes; dask: the
    size of every chunk along each axis), else a grid of :data:`FINGERPRINT_BLOCK_PX`."""
    chunks = getattr(image, "chunks", None)
    starts = []
    for ax in (0, 1):
        c = chunks[ax] if chunks is not None else FINGERPRINT_BLOCK_PX
        if isinstance(c, (int, np.integer)):
            starts.append(np.arange(0, shape[ax], max(1, int(c))))
        else:
            starts.append(np.concatenate([[0], np.cumsum(np.asarray(c, np.int64))[:-1]]).astype(np.int64))
    return starts


def _chunks_touched(starts: list[np.ndarray], shape: tuple[int, ...], step: list[int]) -> int:
    """How many chunks the strided copy ``image[::step0, ::step1]`` would read."""
    n = 1
    for ax in (0, 1):
        n *= np.unique(np.searchsorted(starts[ax], np.arange(0, shape[ax], step[ax]), side="right")).size
    return n


def _block_spans(starts: np.ndarray, n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` along one axis of the blocks at :data:`FINGERPRINT_BLOCK_AT`: each from the start of
    the chunk holding that fraction of ``n``, at most :data:`FINGERPRINT_BLOCK_PX` long, inside that chunk."""
    spans = []
    for f in FINGERPRINT_BLOCK_AT:
        i = int(np.searchsorted(starts, int(f * n), side="right")) - 1
        end = int(starts[i + 1]) if i + 1 < len(starts) else n
        spans.append((int(starts[i]), min(end, int(starts[i]) + FINGERPRINT_BLOCK_PX)))
    return spans


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` then ``os.replace``; the temporary keeps the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_mask(path: Path, mask: np.ndarray) -> None:
    if path.suffix == ".png":
        from PIL import Image

        Image.fromarray(mask).save(path, format="PNG")
    else:
        import tifffile

        tifffile.imwrite(path, mask, compression="zlib")


@dataclass
class SessionData:
    """What a session folder holds (``None`` for parts never saved)."""

    folder: Path
    fingerprint: str
    meta: dict = field(default_factory=dict)
    support: np.ndarray | None = None  # (H, W) uint8 class ids, IGNORE = unknown
    # support regions of a slide: (class ids (h, w), origin = image pixel of their top-left pixel), one file each
    regions: list[tuple[np.ndarray, tuple[int, int]]] = field(default_factory=list)
    points: np.ndarray | None = None  # (N, 2) float64 (row, col)
    point_classes: np.ndarray | None = None  # (N,) int64
    head_path: Path | None = None  # the exported head's JSON, to load with AdaptedHead.load(path, backbone)

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes") or [])

    @property
    def empty(self) -> bool:
        return self.support is None and not self.regions and self.points is None and self.head_path is None


class SessionStore:
    """Session folders under ``root`` (default :func:`default_root`), one per image fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()

    def folder(self, fingerprint: str) -> Path:
        if not fingerprint or not all(c in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"session fingerprint must be lower-case hex, got {fingerprint!r}")
        return self.root / fingerprint

    # -------------------------------------------------------------------------------- writing

    def _update_meta(self, fingerprint: str, part: str, **fields: Any) -> None:
        path = self.folder(fingerprint) / "session.json"
        meta = self._read_meta(path) if path.exists() else {}
        meta.update({k: v for k, v in fields.items() if v is not None})
        meta.update(format=SESSION_FORMAT, version=FORMAT_VERSION, fingerprint=fingerprint)
        meta.setdefault("saved", {})[part] = _now()
        text = json.dumps(meta, indent=2)
        _atomic_write(path, lambda p: p.write_text(text))

    def save_support(self, fingerprint: str, support: np.ndarray, *, classes: list[str] | None = None,
                     colours: list[str] | None = None, image_name: str | None = None,
                     mpp: float | None = None, origin: tuple[int, int] | None = None) -> Path:
        """Save ``support (H, W)`` class ids (IGNORE = unknown) as PNG (TIFF when huge). With ``origin`` (the image
        pixel of its top-left pixel) it is one support *region* of a slide, kept in a file of its own
        (``region-<row>-<col>.png``) beside the other regions; without, the image's support."""
        sup = np.asarray(support)
        if sup.ndim != 2 or not np.issubdtype(sup.dtype, np.integer):
            raise ValueError(f"support must be an (H, W) integer array, got {sup.shape} {sup.dtype}")
        if sup.size and (sup.min() < 0 or sup.max() > IGNORE):
            raise ValueError(f"support class ids must lie in [0, {IGNORE}]")
        sup = sup.astype(np.uint8)
        folder = self.folder(fingerprint)
        if origin is not None:
            r0, c0 = (int(v) for v in origin)
            if r0 < 0 or c0 < 0:
                raise ValueError(f"support region origin must be non-negative, got {origin}")
            name = f"region-{r0}-{c0}.png"
            _atomic_write(folder / name, lambda p: _write_mask(p, sup))
            meta_path = folder / "session.json"
            regions = dict((self._read_meta(meta_path).get("regions") or {}) if meta_path.exists() else {})
            regions[f"{r0},{c0}"] = {"file": name, "shape": list(sup.shape)}
            self._update_meta(fingerprint, "support", regions=regions, classes=classes, colours=colours,
                              image_name=image_name, mpp=mpp)
            return folder / name
        name = "support.png" if sup.size <= PNG_MAX_PIXELS else "support.tif"
        _atomic_write(folder / name, lambda p: _write_mask(p, sup))
        other = folder / ("support.tif" if name == "support.png" else "support.png")
        other.unlink(missing_ok=True)
        self._update_meta(fingerprint, "support", shape=list(sup.shape), classes=classes, colours=colours,
                          image_name=image_name, mpp=mpp)
        return folder / name

    def save_points(self, fingerprint: str, points: np.ndarray, classes: np.ndarray) -> Path:
        """Save ``points (N, 2)`` (row, col) with their class ids as ``points.csv``."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        cls = np.asarray(classes, np.int64).reshape(-1)
        if len(cls) != len(pts):
            raise ValueError(f"{len(pts)} points but {len(cls)} point classes")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["row", "col", "class"])
        w.writerows([f"{r:.3f}", f"{c:.3f}", int(k)] for (r, c), k in zip(pts, cls, strict=True))
        path = self.folder(fingerprint) / "points.csv"
        text = buf.getvalue()
        _atomic_write(path, lambda p: p.write_text(text))
        self._update_meta(fingerprint, "points")
        return path

    def save_head(self, fingerprint: str, head: Any) -> Path:
        """Save an adapted head (anything with ``.save(path)``, e.g. :class:`~.pipeline.AdaptedHead`)."""
        folder = self.folder(fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        _, jpath = head.save(folder / HEAD_STEM)
        self._update_meta(fingerprint, "head", classes=list(getattr(head, "classes", []) or []) or None)
        return Path(jpath)

    # -------------------------------------------------------------------------------- reading

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read session description ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path}: not a {SESSION_FORMAT!r} description")
        return meta

    def has(self, fingerprint: str) -> bool:
        """Whether a session with saved annotations or a head exists for ``fingerprint``."""
        return (self.folder(fingerprint) / "session.json").exists()

    def load(self, fingerprint: str) -> SessionData:
        """Read a session; ValueError naming the file if a part is unreadable."""
        folder = self.folder(fingerprint)
        meta_path = folder / "session.json"
        if not meta_path.exists():
            raise ValueError(f"{folder}: no saved session for this image")
        meta = self._read_meta(meta_path)
        data = SessionData(folder, fingerprint, meta)
        shape = tuple(meta["shape"]) if meta.get("shape") else None
        for name in ("support.png", "support.tif"):
            if (folder / name).exists():
                data.support = read_mask(folder / name, dtype=np.uint8, shape=shape)
        regions = meta.get("regions") or {}
        if not isinstance(regions, dict):
            raise ValueError(f"{meta_path}: 'regions' must be a mapping of 'row,col' to region files")
        for key, reg in sorted(regions.items()):
            try:
                r0, c0 = (int(v) for v in key.split(","))
                path, rshape = folder / str(reg["file"]), tuple(int(v) for v in reg["shape"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{meta_path}: bad support region entry {key!r}: {reg!r}") from None
            if Path(reg["file"]).name != reg["file"] or r0 < 0 or c0 < 0:
                raise ValueError(f"{meta_path}: bad support region entry {key!r}: {reg!r}")
            data.regions.append((read_mask(path, dtype=np.uint8, shape=rshape), (r0, c0)))
        if (folder / "points.csv").exists():  # image coordinates (a slide's: the image shape is not recorded)
            data.points, data.point_classes = read_points_csv(folder / "points.csv",
                                                              shape=None if data.regions else shape)
        head = folder / f"{HEAD_STEM}.mhshead.json"
        data.head_path = head if head.exists() else None
        return data

    def list(self) -> list[dict]:
        """Descriptions (``session.json`` contents plus ``folder``) of every readable session, newest first."""
        out = []
        if not self.root.is_dir():
            return out
        for sub in self.root.iterdir():
            path = sub / "session.json"
            if not path.is_file():
                continue
            try:
                out.append({**self._read_meta(path), "folder": str(sub)})
            except ValueError as e:
                log.warning("skipping session %s: %s", sub, e)
        return sorted(out, key=lambda m: max((m.get("saved") or {"": ""}).values()), reverse=True)
