"""Reader for H&E images: TIFF, OME-TIFF, SVS-like tiled pyramidal TIFF, OME-Zarr / zarr (File → Open).

The layer is RGB ``uint8`` with the file's µm per pixel in ``metadata["mpp"]`` (Aperio ``MPP``, OME
``PhysicalSizeX``, the TIFF resolution tags, a zarr ``mpp`` attribute or an NGFF scale; see
:mod:`napari_metahistoseg.slide`); without resolution metadata there is no ``"mpp"`` (nothing is invented; Adapt
then warns that it assumes the backbone's). Images up to ``TilingConfig.stream_above_mp`` megapixels — those the
plugin processes in memory anyway — are read whole into numpy; larger ones stay lazy: every level is a
:class:`~napari_metahistoseg.slide.LazyImage` (``(H, W, 3) uint8``, decoding only the tiles napari shows), and the
layer is multiscale when the file has pyramid levels. Files this reader does not handle (another format behind the
suffix, multi-plane stacks, multi-channel fluorescence) get None, so napari offers its other readers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import TilingConfig
from ..slide import LazyImage, _Indexed, _layout, _ngff_mpp, _open_tiff, _plausible, _tiff_view

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".svs")  # .ome.tif / .ome.tiff end in these
ZARR_SUFFIX = ".zarr"
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
_PLANES = {"YX", "YXS", "YXC", "SYX", "CYX"}  # axes (of Y, X, S, C) of one greyscale / RGB(A) image
_MAX_CHANNELS = 4  # RGBA; more channels is fluorescence, left to other readers


def get_reader(path: str | list[str]) -> Any:
    """napari reader hook: :func:`read_image` for one TIFF (``.tif``, ``.tiff``, ``.svs``, OME) or zarr holding a
    2-D greyscale / RGB(A) image, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ZARR_SUFFIX:
        return read_image if _is_zarr_image(p) else None
    if suffix in TIFF_SUFFIXES and p.is_file():
        return read_image if _is_tiff_image(p) else None
    return None


def read_image(path: str | list[str], *, in_memory_max_mp: float | None = None) -> list[tuple]:
    """One image layer (see the module docstring); ``ValueError`` naming the file when it cannot be read.
    ``in_memory_max_mp``: images up to this many megapixels are read whole (default
    ``TilingConfig.stream_above_mp``: the plugin processes them in memory anyway)."""
    path = Path(path[0] if isinstance(path, list) else path)
    limit = TilingConfig().stream_above_mp if in_memory_max_mp is None else in_memory_max_mp
    levels, mpp = open_levels(path)
    h, w = levels[0].shape[:2]
    meta = {"mpp": mpp} if mpp else {}
    if mpp is None:
        log.info("%s: no µm per pixel in the metadata", path)
    if h * w <= limit * 1e6:  # read it once, now
        try:
            data: Any = np.asarray(levels[0])
        finally:
            for lvl in levels:
                lvl.close()
        multiscale = False
    else:
        multiscale = len(levels) > 1
        data = levels if multiscale else levels[0]
    name = path.name[: -len(path.suffix)].removesuffix(".ome") if path.suffix else path.name
    kwargs = {"name": name, "rgb": True, "multiscale": multiscale, "contrast_limits": (0, 255), "metadata": meta}
    return [(data, kwargs, "image")]


def open_levels(path: Path) -> tuple[list[LazyImage], float | None]:
    """The image's levels, finest first (each ``(h, w, 3) uint8`` RGB, read region by region), and its µm per
    pixel (None when the file does not say it)."""
    if path.suffix.lower() == ZARR_SUFFIX or path.is_dir():
        return _zarr_levels(path)
    return _tiff_levels(path)


# ------------------------------------------------------------------------------------------------ TIFF


def _is_plane(axes: str, shape: tuple[int, ...]) -> bool:
    """Whether TIFF ``axes``/``shape`` hold one 2-D greyscale or RGB(A) image (other axes of size 1)."""
    kept = [(a, n) for a, n in zip(axes.upper(), shape, strict=False) if a in "YXSC"]
    others = [n for a, n in zip(axes.upper(), shape, strict=False) if a not in "YXSC"]
    channels = [n for a, n in kept if a in "SC"]
    return ("".join(a for a, _ in kept) in _PLANES and all(n == 1 for n in others)
            and all(n <= _MAX_CHANNELS for n in channels))


def _is_tiff_image(path: Path) -> bool:
    import tifffile

    with open(path, "rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return False  # not a TIFF despite its name
    try:
        with tifffile.TiffFile(path) as tf:
            level = tf.series[0].levels[0]
            axes, shape = level.axes, tuple(level.shape)
    except Exception:  # noqa: BLE001 - a damaged TIFF: read_image says what is wrong with it
        return True
    return _is_plane(axes, shape)


def _tiff_levels(path: Path) -> tuple[list[LazyImage], float | None]:
    import tifffile
    import zarr

    base = _open_tiff(path)  # level 0: checks, layout, CMYK, value range, mpp
    levels, tf = [base], None
    try:
        tf = tifffile.TiffFile(path)  # the pyramid levels, read through a handle of their own
        series = tf.series[0]
        overview = None
        if base.raw_dtype != np.uint8 and len(series.levels) > 1:  # one value range for every level
            overview = _tiff_view(series.levels[-1].asarray(), series.levels[-1].axes, path)[0]
        for k, level in enumerate(series.levels[1:], start=1):
            raw, layout = _tiff_view(zarr.open(series.aszarr(level=k), mode="r"), level.axes, path)
            levels.append(LazyImage(raw, layout=layout, name=f"{path} (level {k})", cmyk=base.cmyk,
                                    overview=overview, closer=tf if k == 1 else None))
        if len(levels) == 1:
            tf.close()
    except Exception as e:  # noqa: BLE001 - a damaged pyramid level
        for lvl in levels:
            lvl.close()
        if tf is not None:
            tf.close()
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"{path}: cannot read the TIFF's pyramid levels ({type(e).__name__}: {e})") from None
    return levels, base.mpp


# ------------------------------------------------------------------------------------------------ zarr


def _squeezed(arr: Any) -> Any:
    """``arr`` without the axes of size 1 before its last two when it has more than three (OME-NGFF
    ``t, c, z, y, x`` of one plane → ``c, y, x``), not read."""
    if len(arr.shape) <= 3:
        return arr
    index = tuple(0 if i < len(arr.shape) - 2 and n == 1 else slice(None) for i, n in enumerate(arr.shape))
    return _Indexed(arr, index)


def _zarr_arrays(path: Path) -> tuple[list[Any], dict]:
    """The arrays of a zarr image, finest first (the NGFF ``multiscales`` datasets of a group, else its array
    ``"0"``, ``"image"`` or first array, or the array itself), and their attributes."""
    import zarr

    node = zarr.open(str(path), mode="r")
    if not isinstance(node, zarr.Group):
        return [node], dict(node.attrs)
    attrs = dict(node.attrs)
    attrs = {**attrs, **attrs.get("ome", {})}  # NGFF 0.5 keeps its metadata under "ome"
    try:
        paths = [d["path"] for d in attrs["multiscales"][0]["datasets"]]
    except (KeyError, IndexError, TypeError):
        names = sorted(k for k, _ in node.arrays())
        if not names:
            raise ValueError(f"{path}: zarr group holds no arrays") from None
        paths = ["0" if "0" in names else "image" if "image" in names else names[0]]
    arrays = [node[p] for p in paths]
    return arrays, {**attrs, **dict(arrays[0].attrs)}


def _is_zarr_image(path: Path) -> bool:
    try:
        arrays, _ = _zarr_arrays(path)
        _layout(tuple(_squeezed(arrays[0]).shape), str(path))
    except Exception:  # noqa: BLE001 - not a zarr image this reader handles
        return False
    return True


def _zarr_levels(path: Path) -> tuple[list[LazyImage], float | None]:
    try:
        arrays, attrs = _zarr_arrays(path)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: cannot open as zarr ({type(e).__name__}: {e})") from None
    raws = [_squeezed(a) for a in arrays]
    overview = None
    if np.dtype(raws[0].dtype) != np.uint8 and len(raws) > 1:  # one value range for every level
        overview = np.asarray(raws[-1][(slice(None),) * len(raws[-1].shape)])
    names = [str(path)] + [f"{path} (level {k})" for k in range(1, len(raws))]
    levels = [LazyImage(raw, layout=_layout(tuple(raw.shape), name), name=name, overview=overview)
              for raw, name in zip(raws, names, strict=True)]
    mpp = attrs.get("mpp") or _ngff_mpp(attrs)
    try:
        mpp = float(mpp) if mpp else None
    except (TypeError, ValueError):
        raise ValueError(f"{path}: zarr attribute mpp must be a number (µm per pixel), got {mpp!r}") from None
    return levels, _plausible(mpp, "zarr mpp") if mpp else None
