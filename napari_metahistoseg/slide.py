"""Large images without loading them: lazy region reads in, chunked zarr outputs out.

:func:`open_image` returns a :class:`LazyImage`: an array-like of shape ``(H, W, 3)`` and dtype ``uint8`` whose
slicing (``img[r0:r1, c0:c1]``) reads and decodes only the chunks (TIFF tiles or strips, zarr chunks) that the
region touches. Sources: tiled or pyramidal TIFF, OME-TIFF and SVS-like files (level 0 of the first series, via
``tifffile``'s ``aszarr``), zarr arrays or groups (OME-NGFF level ``"0"``), numpy arrays, and PNG/JPEG (small: read
fully). ``mpp`` (µm per pixel) comes from the metadata: Aperio ``MPP = 0.2527`` in the ImageDescription, OME
``PhysicalSizeX``, the TIFF ``XResolution``/``ResolutionUnit`` tags (cm or inch), a zarr ``mpp`` attribute or an
NGFF scale in micrometres; ``None`` when absent or implausible.

Every region is converted to RGB uint8 by :func:`napari_metahistoseg.data.io.to_rgb_uint8` (its documented rules;
CMYK TIFFs as :func:`~napari_metahistoseg.data.io.read_rgb` converts them), with one difference that keeps tiles
consistent: the value-range decisions (shift negative integers, scale integers whose maximum exceeds 255, scale
floats that lie in [0, 1]) use the minimum and maximum of the whole image when it is small (≤ :data:`SMALL_IMAGE_PX`
pixels) and otherwise of its smallest pyramid level or of :data:`RANGE_SAMPLES` evenly spread windows, never of
one tile.

:func:`create_outputs` makes the zarr group that :func:`napari_metahistoseg.inference.predict_large` streams into.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .data.io import read_rgb, to_rgb_uint8

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8")
SMALL_IMAGE_PX = 4096 * 4096  # images up to this many pixels have their value range taken from all pixels
RANGE_SAMPLES = 16  # windows read to decide the value range of a large image without a pyramid
RANGE_WINDOW_PX = 256  # side of each of those windows
MPP_RANGE = (0.01, 100.0)  # plausible µm per pixel; metadata outside it (e.g. a 72 dpi default) is ignored
_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3,
            "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6, "meter": 1e6}


class LazyImage:
    """A 2-D image read region by region: ``shape (H, W, 3)``, ``dtype uint8``, ``img[r0:r1, c0:c1]`` → RGB.

    ``raw`` is the underlying array (zarr, numpy); ``layout`` says where its channels are (``"yx"``, ``"yxc"``,
    ``"cyx"``); ``mpp`` µm per pixel or ``None``; ``name`` names the source in error messages.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, raw: Any, *, layout: str, name: str, mpp: float | None = None, cmyk: bool = False,
                 overview: Any = None, closer: Any = None) -> None:
        self.raw, self.layout, self.name, self.mpp, self.cmyk = raw, layout, name, mpp, cmyk
        yx = raw.shape[1:3] if layout == "cyx" else raw.shape[:2]
        self.height, self.width = int(yx[0]), int(yx[1])
        if self.height == 0 or self.width == 0:
            raise ValueError(f"{name}: image is empty ({self.height}x{self.width})")
        self.raw_dtype = np.dtype(raw.dtype)
        self._closer = closer
        self._extremes: np.ndarray | None = None
        self._extremes = self._decide_range(overview)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def size(self) -> int:
        return self.height * self.width * 3

    def __len__(self) -> int:
        return self.height

    def __repr__(self) -> str:
        return f"LazyImage({self.name!r}, shape={self.shape}, raw_dtype={self.raw_dtype}, mpp={self.mpp})"

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closer is not None:
            self._closer.close()
            self._closer = None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The whole image (reads everything: meant for small images)."""
        a = self.read(0, 0, self.height, self.width)
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or any(k is Ellipsis or k is None for k in key):
            raise IndexError(f"{self.name}: index with up to three slices/integers, got {key!r}")
        key = key + (slice(None),) * (3 - len(key))
        (r0, r1, rs), (c0, c1, cs) = (_bounds(k, n) for k, n in zip(key[:2], (self.height, self.width), strict=False))
        out = self.read(r0, c0, max(r0, r1), max(c0, c1))[::rs, ::cs]
        out = out[..., key[2]]
        return out[0] if isinstance(key[0], (int, np.integer)) else (
            out[:, 0] if isinstance(key[1], (int, np.integer)) else out)

    def read(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """Region ``[r0:r1, c0:c1]`` (clipped to the image) as ``(h, w, 3) uint8`` RGB."""
        r0, r1 = max(0, r0), min(self.height, r1)
        c0, c1 = max(0, c0), min(self.width, c1)
        if r1 <= r0 or c1 <= c0:
            return np.zeros((max(0, r1 - r0), max(0, c1 - c0), 3), np.uint8)
        raw = self._read_raw(r0, c0, r1, c1)
        return self._to_rgb(raw)

    def _read_raw(self, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        try:
            a = np.asarray(self.raw[:, r0:r1, c0:c1] if self.layout == "cyx" else self.raw[r0:r1, c0:c1])
        except ValueError as e:
            if self.name in str(e):
                raise
            raise ValueError(f"{self.name}: cannot read region rows {r0}:{r1}, cols {c0}:{c1} ({e})") from None
        except Exception as e:  # noqa: BLE001 - decoder/IO failures of a corrupt or truncated file
            raise ValueError(f"{self.name}: cannot read region rows {r0}:{r1}, cols {c0}:{c1}; the file is corrupt "
                             f"or truncated ({type(e).__name__}: {e})") from None
        return np.moveaxis(a, 0, -1) if self.layout == "cyx" else a

    def _to_rgb(self, a: np.ndarray) -> np.ndarray:
        if self.cmyk:
            if not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{self.name}: CMYK image of dtype {a.dtype} is not supported (8/16-bit only)")
            cmyk = a[..., :4].astype(np.float32) / float(np.iinfo(a.dtype).max)
            a = np.rint(255.0 * (1 - cmyk[..., :3]) * (1 - cmyk[..., 3:4])).astype(np.uint8)
        if self._extremes is None or a.dtype != self._extremes.dtype:
            return to_rgb_uint8(a, source=self.name)
        # two extra rows holding the image's minimum and maximum make to_rgb_uint8 take its value-range decisions
        # (shift, scale) for the whole image instead of this region
        ext = np.broadcast_to(self._extremes.reshape((2,) + (1,) * (a.ndim - 1)), (2, *a.shape[1:]))
        return to_rgb_uint8(np.concatenate([a, ext.astype(a.dtype)]), source=self.name)[:-2]

    def _decide_range(self, overview: Any) -> np.ndarray | None:
        """``[min, max]`` of the image's values (raw dtype), or None where no decision depends on them."""
        dt = self.raw_dtype
        if self.cmyk or dt.kind == "b" or dt == np.dtype(np.uint8):
            return None
        if dt.kind not in "iuf":
            raise ValueError(f"{self.name}: unsupported dtype {dt}")
        lo, hi = self._value_range(overview)
        return np.array([lo, hi], dtype=dt)

    def _value_range(self, overview: Any) -> tuple[float, float]:
        if self.height * self.width <= SMALL_IMAGE_PX:
            parts = [self._read_raw(0, 0, self.height, self.width)]
        elif overview is not None:
            parts = [np.asarray(overview)]
        else:
            n = int(math.ceil(math.sqrt(RANGE_SAMPLES)))
            s = RANGE_WINDOW_PX
            rows = np.linspace(0, max(0, self.height - s), n).astype(int)
            cols = np.linspace(0, max(0, self.width - s), n).astype(int)
            parts = [self._read_raw(r, c, r + s, c + s) for r in rows for c in cols]
        finite = [v[np.isfinite(v)] if np.issubdtype(v.dtype, np.floating) else v for v in parts]
        finite = [v for v in finite if v.size]
        if not finite:
            return 0.0, 0.0
        return float(min(v.min() for v in finite)), float(max(v.max() for v in finite))


def _bounds(k: Any, n: int) -> tuple[int, int, int]:
    if isinstance(k, (int, np.integer)):
        i = int(k) + (n if k < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"index {k} out of range for size {n}")
        return i, i + 1, 1
    if isinstance(k, slice):
        start, stop, step = k.indices(n)
        if step <= 0:
            raise IndexError("only positive slice steps are supported")
        return start, stop, step
    raise IndexError(f"unsupported index {k!r}")


def _layout(shape: tuple[int, ...], name: str) -> str:
    """Where the channels are, by the rule of :func:`to_rgb_uint8`; ValueError for anything else."""
    if len(shape) == 2:
        return "yx"
    if len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        return "yxc"
    if len(shape) == 3 and shape[0] in (1, 2, 3, 4):
        return "cyx"
    raise ValueError(f"{name}: expected a 2-D greyscale, RGB or RGBA image, got shape {tuple(shape)} "
                     "(multi-page stacks and multi-channel fluorescence are not supported)")


# ------------------------------------------------------------------------------------------------ open


def open_array(raw: Any, name: str, *, mpp: float | None = None) -> LazyImage:
    """A :class:`LazyImage` over any array-like with ``shape``, ``dtype`` and slicing (numpy, zarr, dask: e.g. level
    0 of a napari image layer), read region by region — never all at once."""
    return LazyImage(raw, layout=_layout(tuple(raw.shape), name), name=name, mpp=mpp)


def open_image(source: str | os.PathLike | np.ndarray, *, mpp: float | None = None) -> LazyImage:
    """Open an image for region reads (see the module docstring). ``mpp`` overrides the metadata.

    Raises ``ValueError`` naming the file for missing, empty, unreadable, truncated or unsupported images.
    """
    if isinstance(source, np.ndarray):
        img = LazyImage(source, layout=_layout(source.shape, "array"), name="array")
    else:
        path = Path(source)
        if not path.exists():
            raise ValueError(f"{path}: file not found")
        if path.is_dir() or path.suffix.lower() == ".zarr":
            img = _open_zarr(path)
        elif path.stat().st_size == 0:
            raise ValueError(f"{path}: file is empty (0 bytes)")
        elif path.suffix.lower() in TIFF_SUFFIXES:
            img = _open_tiff(path)
        else:
            arr = read_rgb(path)
            img = LazyImage(arr, layout="yxc", name=str(path))
    if mpp is not None:
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a number > 0 (µm per pixel), got {mpp!r}")
        img.mpp = float(mpp)
    return img


def _open_tiff(path: Path) -> LazyImage:
    import tifffile
    import zarr

    try:
        tf = tifffile.TiffFile(path)
    except Exception as e:  # noqa: BLE001 - tifffile raises several types for damaged headers
        raise ValueError(f"{path}: cannot read TIFF, file is corrupt or truncated ({type(e).__name__}: {e})") from None
    try:
        if not tf.series:
            raise ValueError(f"{path}: TIFF has no images (file is corrupt or truncated)")
        series = tf.series[0]
        page = series.levels[0].keyframe
        _check_not_truncated(path, series.levels[0].pages, page)
        raw = zarr.open(series.aszarr(level=0), mode="r")
        axes = series.levels[0].axes
        raw, layout = _tiff_view(raw, axes, path)
        cmyk = getattr(page, "photometric", None) == tifffile.PHOTOMETRIC.SEPARATED and raw.shape[-1] >= 4
        overview = None
        if len(series.levels) > 1:
            low = series.levels[-1]
            ov, _ = _tiff_view(low.asarray(), low.axes, path)
            overview = ov
        return LazyImage(raw, layout=layout, name=str(path), mpp=tiff_mpp(tf), cmyk=cmyk,
                         overview=overview, closer=tf)
    except ValueError:
        tf.close()
        raise
    except Exception as e:  # noqa: BLE001
        tf.close()
        raise ValueError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from None


def _check_not_truncated(path: Path, pages: Any, keyframe: Any) -> None:
    """Every tile/strip of level 0 must lie inside the file (a cut download otherwise fails mid-prediction)."""
    size = path.stat().st_size
    for p in pages[:1] if pages else [keyframe]:
        offs = np.asarray(getattr(p, "dataoffsets", ()), np.int64)
        counts = np.asarray(getattr(p, "databytecounts", ()), np.int64)
        if offs.size and counts.size and int((offs + counts).max()) > size:
            raise ValueError(f"{path}: TIFF is truncated: image data extends to byte {int((offs + counts).max())} "
                             f"but the file has {size} bytes")


def _tiff_view(raw: Any, axes: str, path: Path) -> tuple[Any, str]:
    """Drop leading non-spatial axes (first page / plane) and name the channel layout."""
    axes = axes.upper()
    keep = {"Y", "X", "S", "C"}
    index = tuple(0 if a not in keep else slice(None) for a in axes)
    kept = "".join(a for a in axes if a in keep)
    if index and any(i == 0 for i in index):
        log.info("%s: reading the first plane of axes %s", path, axes)
        raw = raw[index] if isinstance(raw, np.ndarray) else _Indexed(raw, index)
    if kept in ("YX",):
        return raw, "yx"
    if kept in ("YXS", "YXC"):
        return raw, "yxc" if raw.shape[-1] <= 4 else _bad_channels(raw.shape, path)
    if kept in ("SYX", "CYX"):
        return raw, "cyx" if raw.shape[0] <= 4 else _bad_channels(raw.shape, path)
    raise ValueError(f"{path}: unsupported TIFF axes {axes!r} (expected a 2-D greyscale, RGB or RGBA image)")


def _bad_channels(shape: tuple[int, ...], path: Path) -> str:
    raise ValueError(f"{path}: expected a greyscale, RGB or RGBA image, got {min(shape)} channels "
                     f"(shape {tuple(shape)}); multi-channel fluorescence is not supported")


class _Indexed:
    """A lazy view of ``raw[index]`` where ``index`` fixes some leading axes to 0."""

    def __init__(self, raw: Any, index: tuple) -> None:
        self.raw, self.index = raw, index
        self.shape = tuple(n for n, i in zip(raw.shape, index, strict=False) if i != 0)
        self.dtype = raw.dtype

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = list(key) + [slice(None)] * (len(self.shape) - len(key))
        full = tuple(0 if i == 0 else key.pop(0) for i in self.index)
        return self.raw[full]


def tiff_mpp(tf: Any) -> float | None:
    """µm per pixel from an open ``tifffile.TiffFile``: Aperio MPP, OME PhysicalSizeX, then resolution tags."""
    page = tf.pages[0]
    desc = page.description or ""
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        return _plausible(float(m.group(1)), "Aperio MPP")
    if tf.is_ome and tf.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        if m:
            u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
            factor = _UNIT_UM.get(u.group(1) if u else "µm")
            if factor is not None:
                return _plausible(float(m.group(1)) * factor, "OME PhysicalSizeX")
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num > 0 and den > 0 and unit in (2, 3):
            per_um = (num / den) / (25400.0 if unit == 2 else 10000.0)
            return _plausible(1.0 / per_um, "TIFF XResolution")
    return None


def _plausible(mpp: float, what: str) -> float | None:
    if math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return float(mpp)
    log.warning("ignoring implausible %s of %s µm/px", what, mpp)
    return None


def _open_zarr(path: Path) -> LazyImage:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot open as zarr ({type(e).__name__}: {e})") from None
    attrs: dict = {}
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        names = sorted(k for k, _ in node.arrays())
        if not names:
            raise ValueError(f"{path}: zarr group holds no arrays")
        name = "0" if "0" in names else "image" if "image" in names else names[0]
        node = node[name]
    attrs = {**attrs, **dict(node.attrs)}
    mpp = attrs.get("mpp") or _ngff_mpp(attrs)
    return LazyImage(node, layout=_layout(node.shape, str(path)), name=str(path),
                     mpp=_plausible(float(mpp), "zarr mpp") if mpp else None)


def _ngff_mpp(attrs: dict) -> float | None:
    try:
        ms = attrs["multiscales"][0]
        axes = ms["axes"]
        scale = next(t["scale"] for t in ms["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
        ix = next(i for i, a in enumerate(axes) if a.get("name") == "x")
        return float(scale[ix]) * _UNIT_UM[axes[ix].get("unit", "micrometer")]
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ outputs


def create_outputs(path: str | os.PathLike, shape: tuple[int, int], arrays: dict[str, tuple[tuple[int, ...], str]],
                   *, chunk_px: int, attrs: dict | None = None) -> Any:
    """Create (overwrite) the zarr group ``path`` with ``arrays = {name: (leading_shape, dtype)}`` of shape
    ``leading_shape + shape``, chunked ``chunk_px`` square (whole leading axes per chunk); returns the group."""
    import zarr

    root = zarr.open_group(str(path), mode="w")
    for name, (lead, dtype) in arrays.items():
        root.create_array(name, shape=tuple(lead) + tuple(shape), dtype=dtype, fill_value=0,
                          chunks=tuple(lead) + (min(chunk_px, shape[0]), min(chunk_px, shape[1])))
    root.attrs.update({**(attrs or {}), "complete": False})
    return root


PYRAMID_GROUP = "levels"  # levels of a streamed label array NAME: <group>/NAME/1, <group>/NAME/2, ...


def write_pyramid(root: Any, name: str, *, min_side_px: int, strip_mb: float = 64.0,
                  region: tuple[int, int, int, int] | None = None) -> list[Any]:
    """Nearest-neighbour levels of the ``(H, W)`` label array ``root[name]`` of a zarr group: level k keeps every
    2**k-th pixel of each axis (labels stay labels), until the longer side is at most ``min_side_px``. Each level is
    built from the previous one in row strips of about ``strip_mb`` (bounded memory) and stored as
    ``root["levels/<name>/<k>"]``; returns the level arrays, finest first (empty when the array is small enough).
    Existing levels of ``name`` are replaced. ``region = (r0, c0, r1, c1)``: only that part of the array holds
    labels (the rest is the fill value 0, e.g. a prediction of the visible field only), so only its part of each
    level is computed — the cost follows the region, not the slide."""
    base = root[name]
    group = root.require_group(PYRAMID_GROUP)
    if name in group:
        del group[name]
    levels: list[Any] = []
    if min_side_px <= 0:
        return levels
    prev, k = base, 0
    r0, c0, r1, c1 = region if region is not None else (0, 0, base.shape[0], base.shape[1])
    r0, c0 = r0 // 2 * 2, c0 // 2 * 2  # on the grid of every level's sampling
    sub = group.require_group(name)
    while max(prev.shape) > min_side_px:
        k += 1
        h, w = -(-prev.shape[0] // 2), -(-prev.shape[1] // 2)
        chunks = tuple(min(c, s) for c, s in zip(base.chunks, (h, w), strict=True))
        lvl = sub.create_array(str(k), shape=(h, w), dtype=base.dtype, fill_value=0, chunks=chunks)
        rows = max(2, int(strip_mb * 2**20 / max(1, (c1 - c0) * prev.dtype.itemsize)) // 2 * 2)
        for a in range(r0, r1, rows):
            block = np.asarray(prev[a:min(a + rows, r1), c0:c1])[::2, ::2]  # a, c0 even: on the level's grid
            lvl[a // 2: a // 2 + block.shape[0], c0 // 2: c0 // 2 + block.shape[1]] = block
        levels.append(lvl)
        prev = lvl
        r0, c0, r1, c1 = r0 // 4 * 2, c0 // 4 * 2, -(-r1 // 2), -(-c1 // 2)  # the region on this level, even start
    return levels


def pyramid(root: Any, name: str) -> list[Any]:
    """``[root[name], level 1, level 2, ...]`` (just ``[root[name]]`` without levels): a multiscale label view."""
    out = [root[name]]
    if PYRAMID_GROUP in root and name in root[PYRAMID_GROUP]:
        group = root[PYRAMID_GROUP][name]
        out += [group[k] for k in sorted(group.array_keys(), key=int)]
    return out


def labelled_box(labels: np.ndarray, unknown: int = 255) -> tuple[int, int, int, int] | None:
    """``(r0, r1, c0, c1)`` bounding the pixels of ``labels`` that are not ``unknown``; None if there are none."""
    rows = np.flatnonzero((labels != unknown).any(1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((labels[rows[0]:rows[-1] + 1] != unknown).any(0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def label_window(image: Any, labels: np.ndarray, margin_px: int, origin: tuple[int, int] = (0, 0),
                 unknown: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """The part of ``image`` (any sliceable ``(H, W, ...)`` array) around the labelled pixels of ``labels`` plus
    ``margin_px`` of context, and the labels on that window: ``labels`` covers the image from pixel ``origin`` (a
    region of a slide; the whole image when it has its shape), the context may reach beyond it (unknown there).
    Only the window is read. Nothing labelled: a 1x1 window of unknown."""
    box = labelled_box(labels, unknown)
    if box is None:
        return np.asarray(image[:1, :1]), np.full((1, 1), unknown, labels.dtype)
    h, w = int(image.shape[0]), int(image.shape[1])
    o0, o1 = (int(v) for v in origin)
    if o0 < 0 or o1 < 0 or o0 + labels.shape[0] > h or o1 + labels.shape[1] > w:
        raise ValueError(f"labels of {labels.shape[0]}x{labels.shape[1]} at row {o0}, column {o1} do not fit "
                         f"the image of {h}x{w}")
    r0, r1 = max(0, o0 + box[0] - margin_px), min(h, o0 + box[1] + margin_px)
    c0, c1 = max(0, o1 + box[2] - margin_px), min(w, o1 + box[3] + margin_px)
    out = np.full((r1 - r0, c1 - c0), unknown, labels.dtype)
    a0, a1 = max(r0, o0), min(r1, o0 + labels.shape[0])  # the labels' part of the window
    b0, b1 = max(c0, o1), min(c1, o1 + labels.shape[1])
    out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = labels[a0 - o0:a1 - o0, b0 - o1:b1 - o1]
    return np.asarray(image[r0:r1, c0:c1]), out
