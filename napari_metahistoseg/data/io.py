"""Reading images, masks and point files with clear errors and documented conversion rules.

Conversion rule for images (:func:`to_rgb_uint8`), applied everywhere an image enters:

* ``(H, W)`` greyscale → replicated to 3 channels.
* ``(H, W, 4)`` RGBA → alpha-composited onto white (slides' empty glass is white).
* ``(H, W, 2)`` grey+alpha → the same, after replicating grey.
* ``(1, H, W)``/``(3, H, W)``/``(4, H, W)`` channel-first (only when the last axis is not 1–4) → moved last.
* ``uint16``/other integers → linearly scaled by the dtype's maximum value if any value exceeds 255,
  else cast. Signed integers holding negative values are first shifted so that their minimum is 0 and then
  scaled by the dtype's full range (``max - min``) if any shifted value exceeds 255.
* floats → NaN/inf rejected; values in [0, 1] scaled by 255, otherwise clipped to [0, 255].
* bool → 0/255.
* More channels (e.g. CMYK as 4 colour channels is *not* detectable from the array alone; TIFFs that declare
  ``photometric=SEPARATED`` are converted by :func:`read_rgb`: ``RGB = max * (1 - C/max) * (1 - K/max)``
  scaled to 0–255, with ``max`` the dtype's maximum) or more dimensions (multi-page stacks) → ``ValueError``;
  for multi-page TIFFs the first page (level 0) is read.

Every failure is a ``ValueError`` naming the file (or ``source``) and the problem; an image too large to hold
in memory is reported as such (open whole slides with :mod:`napari_metahistoseg.slide` instead).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np


def to_rgb_uint8(arr: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Convert an array to ``(H, W, 3) uint8`` RGB by the module's documented rule or raise ValueError."""
    try:
        a = np.asarray(arr)
    except (ValueError, TypeError) as e:  # ragged nested lists and the like
        raise ValueError(f"{source}: not an image array ({e})") from None
    dtype = a.dtype
    if a.dtype == object or a.size == 0 and a.ndim != 3:
        raise ValueError(f"{source}: not an image array (shape {a.shape}, dtype {a.dtype})")
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{source}: expected a 2-D greyscale, RGB or RGBA image, got shape {a.shape} "
            "(multi-page stacks and multi-channel fluorescence are not supported)"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{source}: image is empty ({a.shape[0]}x{a.shape[1]})")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{source}: image contains NaN or inf values")
        if a.min() >= 0 and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        if a.dtype != np.uint8:
            info = np.iinfo(dtype)
            scale = float(info.max)
            if a.min() < 0:
                # shift in float64: int64 - min(int64) overflows any integer type
                a = a.astype(np.float64) - float(a.min())
                scale = float(info.max) - float(info.min)
            mx = float(a.max()) if a.size else 0.0
            if mx > 255:
                a = np.rint(a.astype(np.float64) / scale * 255.0)
            a = np.clip(a, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"{source}: unsupported dtype {a.dtype}")
    c = a.shape[-1]
    if c in (2, 4):
        alpha = a[..., -1:].astype(np.float32) / 255.0
        colour = a[..., :-1].astype(np.float32)
        a = np.clip(np.rint(colour * alpha + 255.0 * (1 - alpha)), 0, 255).astype(np.uint8)
        c -= 1
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.ascontiguousarray(a)


def _read_any(path: Path) -> np.ndarray:
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff", ".svs"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                arr = page.asarray()
                if getattr(page, "photometric", None) == tifffile.PHOTOMETRIC.SEPARATED and arr.shape[-1] >= 4:
                    if not np.issubdtype(arr.dtype, np.integer):
                        raise ValueError(f"{path}: CMYK image of dtype {arr.dtype} is not supported (8/16-bit only)")
                    cmyk = arr[..., :4].astype(np.float32) / float(np.iinfo(arr.dtype).max)
                    k = cmyk[..., 3:4]
                    arr = np.rint(255.0 * (1 - cmyk[..., :3]) * (1 - k)).astype(np.uint8)
                return arr
        from skimage import io as skio

        return np.asarray(skio.imread(path))
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: cannot read image ({e})") from None
    except MemoryError:
        raise ValueError(f"{path}: image too large to read into memory (open slides with "
                         "napari_metahistoseg.slide.open_image)") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one clear message
        raise ValueError(f"{path}: cannot read image, file is corrupt or truncated ({type(e).__name__}: {e})") from None


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3) uint8`` RGB (conversion rule in the module docstring)."""
    path = Path(path)
    arr = _read_any(path)
    try:
        return to_rgb_uint8(arr, source=str(path))
    except MemoryError:
        raise ValueError(f"{path}: image of shape {arr.shape} too large to convert in memory (open slides with "
                         "napari_metahistoseg.slide.open_image)") from None


def read_mask(
    path: str | os.PathLike, *, dtype: type = np.uint32, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a label image (PNG/TIFF) as a 2-D integer array; check ``shape`` if given."""
    path = Path(path)
    arr = _read_any(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # label PNG saved as RGB(A) with equal channels
        if not np.all(arr[..., 0:1] == arr[..., :3]):
            raise ValueError(f"{path}: label image has colour channels that differ; expected one label per pixel")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: label image must be 2-D, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{path}: label image must hold integers, got {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{path}: label image has negative values")
    if arr.size and int(arr.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{path}: label value {int(arr.max())} does not fit {np.dtype(dtype).name}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{path}: label image shape {arr.shape} does not match the image shape {tuple(shape)}")
    return arr.astype(dtype)


def read_points_csv(
    path: str | os.PathLike, *, shape: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read points from CSV → ``(N, 2) float64`` (row, col), ``(N,) int64`` classes.

    Accepted headers: ``row,col[,class]``, ``y,x[,class]`` or ``x,y[,class]`` (x = column); napari's
    points CSV (``index,axis-0,axis-1``) too. A missing class column means class 1. Points outside
    ``shape`` or non-finite raise ``ValueError`` naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a CSV file")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text CSV file") from None
    except csv.Error as e:  # e.g. a field longer than csv.field_size_limit()
        raise ValueError(f"{path}: not a valid CSV file ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    if not rows:
        raise ValueError(f"{path}: empty points file")
    header = [h.strip().lower() for h in rows[0]]
    if {"row", "col"} <= set(header):
        ir, ic = header.index("row"), header.index("col")
    elif {"axis-0", "axis-1"} <= set(header):
        ir, ic = header.index("axis-0"), header.index("axis-1")
    elif {"x", "y"} <= set(header):
        ir, ic = header.index("y"), header.index("x")
    else:
        raise ValueError(f"{path}: header must name row,col or x,y (got {rows[0]})")
    ik = next((header.index(k) for k in ("class", "label", "type") if k in header), None)
    pts, cls = [], []
    for i, r in enumerate(rows[1:], start=2):
        if not r or all(not v.strip() for v in r):
            continue
        try:
            rr, cc = float(r[ir]), float(r[ic])
            k = int(float(r[ik])) if ik is not None and r[ik].strip() else 1
        except (ValueError, IndexError, OverflowError):  # OverflowError: int(float("inf"))
            raise ValueError(f"{path}: line {i}: cannot parse {r}") from None
        if not (np.isfinite(rr) and np.isfinite(cc)):
            raise ValueError(f"{path}: line {i}: point has NaN/inf coordinates")
        if shape is not None and not (0 <= rr < shape[0] and 0 <= cc < shape[1]):
            raise ValueError(
                f"{path}: line {i}: point (row={rr}, col={cc}) lies outside the image of {shape[0]}x{shape[1]}"
            )
        if k < 0:
            raise ValueError(f"{path}: line {i}: negative class {k}")
        pts.append((rr, cc))
        cls.append(k)
    return np.asarray(pts, np.float64).reshape(-1, 2), np.asarray(cls, np.int64)
