"""HoVer-Net post-processing: NP + HV maps → nucleus instances and a per-nucleus table; and HV training targets.

Small single-purpose steps (as in MONAI's HoVer-Net transforms), composed by :class:`HoVerPostProcessor`:

1. :func:`watershed_mask`     ``np_prob (H, W) float`` → ``(H, W) bool`` nuclear mask
2. :func:`hv_edge_map`        ``hv (2, H, W) float`` → ``(H, W) float32`` edge strength in [0, 1]
3. :func:`markers`            mask + edge → ``(H, W) int32`` markers 1..M
4. :func:`watershed_surface`  mask + edge → ``(H, W) float32`` relief; :func:`watershed` → ``(H, W) uint32``

The algorithm is hover_net's ``__proc_np_hv`` with every constant a :class:`HoVerPostConfig` field in µm
(converted with the maps' µm/pixel). Differences: the NP mask can have its holes filled; the marker opening uses a
disk (hover_net: a 5x5 ellipse). Speed: the Sobel filters run as banded matrix products, a mask component with a
single marker is assigned to it without flooding, the remaining components are flooded in one compact mosaic, the
marker opening runs at the marker pixels only, and with ``cfg.threads > 1`` the edge map is computed beside the mask
labelling and the markers/watershed run on the upper and lower halves of the components in two threads (identical
result).
``hv[0]`` is the horizontal map (x, along columns), ``hv[1]`` the vertical map (y, along rows).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed as _sk_watershed

from napari_metahistoseg.config import HoVerPostConfig, ObjectPostConfig

_BLUR_TRUNCATE_SIGMAS = 1.5  # support of the relief blur in sigmas (radius 1 px at hover_net's 0.8 px sigma)
_SPARSE_OPEN_RATIO = 1.0  # open at the mask's pixels when pixels x disk offsets <= this x the image size
_BAND_BLOCK_PX = 8  # output rows/columns per matrix product of the banded (Sobel) correlation
_BAND_PRODUCT_MNK = 1 << 18  # bound on m*n*k per product: OpenBLAS keeps these single-threaded (its threads
#                             thrash on a busy machine, and one thread is as fast for such thin products)
Box = tuple[slice, slice]

# ------------------------------------------------------------------------------------------------ checks


def _check_mpp(mpp: float) -> float:
    if not isinstance(mpp, (int, float, np.floating)) or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (µm per pixel) must be a finite number > 0, got {mpp!r}")
    return float(mpp)


def _check_2d(a: np.ndarray, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty (H, W) array, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)}")
    return a


# probabilities this close outside [0, 1] are rounding errors (a sum of softmax outputs, a resampled map): clipped
ROUNDING_SLACK = 1e-4


def _check_float(a: np.ndarray, name: str, lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    amin, amax = float(a.min()), float(a.max())  # nan propagates and fails the comparison
    if not (lo - ROUNDING_SLACK <= amin and amax <= hi + ROUNDING_SLACK and math.isfinite(amin)
            and math.isfinite(amax)):
        raise ValueError(f"{name} must be finite and within [{lo}, {hi}], got range [{amin}, {amax}]")
    return np.clip(a, lo, hi) if amin < lo or amax > hi else a


def _check_hv(hv: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    hv = np.asarray(hv)
    if hv.ndim != 3 or hv.shape[0] != 2 or 0 in hv.shape or (shape is not None and hv.shape[1:] != tuple(shape)):
        want = f"(2, {shape[0]}, {shape[1]})" if shape is not None else "(2, H, W)"
        raise ValueError(f"hv must be a {want} array (horizontal, vertical), got shape {hv.shape}")
    return _check_float(hv, "hv")


def _check_nc(nc_prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    nc_prob = np.asarray(nc_prob)
    if nc_prob.ndim != 3 or nc_prob.shape[0] < 2 or nc_prob.shape[1:] != tuple(shape):
        raise ValueError(f"nc_prob must be (C >= 2, H, W) with (H, W) = {tuple(shape)}, got {nc_prob.shape}")
    return _check_float(nc_prob, "nc_prob", 0.0, 1.0)


def _check_instances(instances: np.ndarray) -> np.ndarray:
    inst = _check_2d(instances, "instances")
    if not np.issubdtype(inst.dtype, np.integer) or inst.min() < 0:
        raise ValueError(f"instances must be a non-negative integer (H, W) map, got dtype {inst.dtype}")
    return inst


def sobel_size_px(size_um: float, mpp: float) -> int:
    """Sobel kernel size in pixels: ``size_um / mpp`` rounded to the nearest odd integer, at least 3."""
    return max(3, 2 * int(math.floor((size_um / _check_mpp(mpp) - 1) / 2 + 0.5)) + 1)


# ------------------------------------------------------------------------------------------------ morphology


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (4-connected background) via one labelling of the background."""
    bg, n = ndi.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        outside[edge] = True
    outside[0] = True
    return mask if outside.all() else mask | ~outside[bg]


def _fill_holes_inside(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill holes of ``seed ⊂ mask`` for a ``mask`` without holes: a hole is then a component of
    ``mask & ~seed`` touching neither a background pixel nor the image border (all background reaches the border).
    """
    rest, n = ndi.label(mask & ~seed)
    if n == 0:
        return seed
    inner = np.zeros_like(mask)  # 4-neighbour erosion of the mask; border pixels erode
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    reaches_out = np.bincount(rest[mask & ~inner], minlength=n + 1) > 0
    reaches_out[0] = True
    return seed if reaches_out.all() else seed | ~reaches_out[rest]


def _small_components(mask: np.ndarray, min_px: float) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of ``mask``: (int32 labels, ``keep`` (n+1,) bool — False for those < ``min_px``)."""
    lab, n = ndi.label(mask)
    keep = np.bincount(lab[mask], minlength=n + 1) >= min_px  # over the mask's pixels only (a sparse mask)
    keep[0] = False
    return lab, keep


def _drop(lab: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Labels with the dropped components removed, renumbered 1..n in order."""
    if keep[1:].all():
        return lab
    lut = (np.cumsum(keep) * keep).astype(lab.dtype)
    return lut[lab]


def _segment_op(a: np.ndarray, half: int, axis: int, erode: bool) -> np.ndarray:
    """Binary erosion/dilation by a ``2*half+1`` segment along ``axis``; the border never erodes or dilates."""
    if half == 0:
        return a
    out = a.copy()
    op = np.logical_and if erode else np.logical_or
    for s in range(1, half + 1):
        if axis == 0:
            op(out[s:], a[:-s], out=out[s:])
            op(out[:-s], a[s:], out=out[:-s])
        else:
            op(out[:, s:], a[:, :-s], out=out[:, s:])
            op(out[:, :-s], a[:, s:], out=out[:, :-s])
    return out


def _disk_rectangles(radius_px: float) -> list[tuple[int, int]]:
    """The disk ``r² + c² <= radius²`` as a union of centred rectangles ``(half_height, half_width)``."""
    top = int(math.floor(radius_px))
    widths = [int(math.floor(math.sqrt(radius_px**2 - j * j))) for j in range(top + 1)]
    return [(j, widths[j]) for j in range(top + 1) if j == top or widths[j] > widths[j + 1]]


def binary_open_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary opening of ``(H, W) bool`` by the disk ``r² + c² <= radius_px²``; outside the image counts as
    foreground for the erosion (the border never erodes). A sparse mask (few pixels times disk offsets, as markers
    are) is opened at its own pixels; a dense one with separable rectangles over the whole array."""
    rects = _disk_rectangles(radius_px)
    if rects == [(0, 0)]:
        return mask
    k = int(math.floor(radius_px))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    disk = yy**2 + xx**2 <= radius_px**2
    n = int(np.count_nonzero(mask))
    if n * int(disk.sum()) <= _SPARSE_OPEN_RATIO * mask.size:
        return _open_sparse(mask, yy[disk], xx[disk], k)
    eroded = np.logical_and.reduce([_segment_op(_segment_op(mask, h, 0, True), w, 1, True) for h, w in rects])
    return np.logical_or.reduce([_segment_op(_segment_op(eroded, h, 0, False), w, 1, False) for h, w in rects])


def _open_sparse(mask: np.ndarray, dy: np.ndarray, dx: np.ndarray, k: int) -> np.ndarray:
    """Opening by the structuring element of offsets ``(dy, dx)`` (within ``k`` px) evaluated only at the mask's
    pixels: a pixel survives the erosion if every offset lands on the mask (or outside the image); the dilation
    scatters the survivors by the offsets."""
    h, w = mask.shape
    padded = np.ones((h + 2 * k, w + 2 * k), dtype=bool)  # outside = foreground: the border never erodes
    padded[k:k + h, k:k + w] = mask
    pw = w + 2 * k
    rows, cols = np.nonzero(mask)
    idx = (rows + k) * pw + (cols + k)
    offsets = dy.astype(np.int64) * pw + dx
    flat = padded.ravel()
    keep = np.ones(idx.size, dtype=bool)
    for off in offsets:
        keep &= flat[idx + off]
    out = np.zeros_like(padded)
    flat_out = out.ravel()
    core = idx[keep]
    for off in offsets:
        flat_out[core + off] = True
    return np.ascontiguousarray(out[k:k + h, k:k + w])


# ------------------------------------------------------------------------------------------------ Sobel


def sobel_kernels(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's generalised Sobel kernels of odd ``size_px``: (binomial smoothing, derivative of binomial).

    ``smooth`` = binomial coefficients of order ``size_px - 1``; ``deriv`` = binomial of order ``size_px - 3``
    convolved with ``[-1, 0, 1]`` in correlation order (as ``cv2.getDerivKernels``). Both ``(size_px,) float64``,
    scaled to unit L1 norm (the edge map is min-max normalised, so the scale does not matter).
    """
    if size_px < 3 or size_px % 2 == 0:
        raise ValueError(f"Sobel kernel size must be an odd integer >= 3, got {size_px}")
    smooth = np.array([math.comb(size_px - 1, i) for i in range(size_px)], dtype=np.float64)
    base = np.array([math.comb(size_px - 3, i) for i in range(size_px - 2)], dtype=np.float64)
    deriv = np.convolve(base, [1.0, 0.0, -1.0])[::-1]  # [-1, ..., 0, ..., 1]
    return smooth / smooth.sum(), deriv / np.abs(deriv).sum()


def _correlate_banded(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.ndimage.correlate1d(x, kernel, axis, mode="mirror")`` for ``(H, W) float32``, as thin products
    with a banded matrix (BLAS is several times faster than a direct loop for long kernels). For ``axis=1`` the
    result is a Fortran-ordered view (writing it transposed is much faster than a strided write)."""
    xt = x if axis == 0 else x.T  # work along rows of xt; the transposed views go to BLAS without copies
    r, size = kernel.size // 2, xt.shape[0]
    block = min(_BAND_BLOCK_PX, size)
    band = np.zeros((block, block + 2 * r), np.float32)
    for i in range(block):
        band[i, i:i + kernel.size] = kernel
    chunk = max(1, _BAND_PRODUCT_MNK // band.size)  # along the other axis
    outt = np.empty(xt.shape, np.float32)  # contiguous in the working layout (axis 1: returned transposed)
    for s in range(0, size, block):
        n = min(block, size - s)
        if r <= s and s + n + r <= size:
            win = xt[s - r:s + n + r]
        else:  # near the ends: mirror (numpy "reflect" == scipy "mirror" == OpenCV BORDER_REFLECT_101)
            lo, hi = max(s - r, 0), min(s + n + r, size)
            win = np.pad(xt[lo:hi], ((lo - (s - r), (s + n + r) - hi), (0, 0)), mode="reflect") if size > 1 else \
                np.repeat(xt[lo:hi], n + 2 * r, axis=0)
        for c in range(0, xt.shape[1], chunk):
            np.matmul(band[:n, :n + 2 * r], win[:, c:c + chunk], out=outt[s:s + n, c:c + chunk])
    return outt if axis == 0 else outt.T


def hv_edge_map(hv: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """Step 2. ``hv (2, H, W)`` float → ``(H, W) float32`` edge strength in [0, 1] (high between nuclei).

    hover_net: ``max(1 - minmax(Sobel_x(minmax(h))), 1 - minmax(Sobel_y(minmax(v))))`` with an OpenCV-style Sobel
    of ``cfg.sobel_kernel_um`` and mirrored borders. The inner min-max normalisation is an affine map that the
    outer one cancels, so it is skipped.
    """
    hv = _check_hv(hv)
    return _edge_from_grads([_sobel_gradient(hv, ch, cfg, mpp) for ch in (0, 1)])


def _sobel_gradient(hv: np.ndarray, ch: int, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """Min-max normalised Sobel derivative of ``hv[ch]`` across its own axis (ch 0: along columns, 1: rows)."""
    smooth, deriv = (k.astype(np.float32) for k in sobel_kernels(sobel_size_px(cfg.sobel_kernel_um, mpp)))
    g = _correlate_banded(_correlate_banded(hv[ch], smooth, axis=ch), deriv, axis=1 - ch)
    lo, hi = float(g.min()), float(g.max())
    g -= lo
    g *= 1.0 / (hi - lo) if hi > lo else 0.0
    return g


def _edge_from_grads(grads: list[np.ndarray]) -> np.ndarray:
    edge = np.minimum(grads[0], grads[1], out=grads[0])
    return np.subtract(np.float32(1.0), edge, out=edge)  # max(1 - a, 1 - b) == 1 - min(a, b)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Shared worker threads for the two Sobel passes (BLAS products release the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hover-sobel")
        return _POOL


# ------------------------------------------------------------------------------------------------ steps


def watershed_mask(np_prob: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """Step 1. ``np_prob (H, W)`` float in [0, 1] → ``(H, W) bool`` nuclear mask.

    Pixels with probability ≥ ``cfg.np_threshold``; holes filled if ``cfg.fill_mask_holes``; 4-connected objects
    smaller than ``cfg.min_object_area_um2`` removed.
    """
    _, comp, keep = _mask_components(np_prob, cfg, mpp)
    return keep[comp]


def _mask_components(np_prob: np.ndarray, cfg: HoVerPostConfig,
                     mpp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask before the size filter, its component labels, ``keep`` flag per component)."""
    np_prob = _check_float(_check_2d(np_prob, "np_prob"), "np_prob", 0.0, 1.0)
    mask = np_prob >= cfg.np_threshold
    if cfg.fill_mask_holes:
        mask = _fill_holes(mask)
    return (mask, *_small_components(mask, cfg.min_object_area_um2 / _check_mpp(mpp) ** 2))


def markers(mask: np.ndarray, edge: np.ndarray, cfg: HoVerPostConfig, mpp: float, *,
            mask_has_no_holes: bool = False) -> np.ndarray:
    """Step 3. ``mask (H, W) bool`` + ``edge (H, W) float`` → ``(H, W) int32`` markers labelled 1..M.

    hover_net: mask pixels with ``edge < cfg.marker_threshold``, holes filled, opened with a disk of
    ``cfg.marker_open_radius_um``, 4-connected markers smaller than ``cfg.min_marker_area_um2`` removed.
    ``mask_has_no_holes=True`` (true for :func:`watershed_mask` with ``cfg.fill_mask_holes``) enables a cheaper,
    equivalent hole filling.
    """
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    edge = _check_float(_check_2d(edge, "edge", mask.shape), "edge")
    return _drop(*_marker_components(mask, edge, cfg, _check_mpp(mpp), mask_has_no_holes))


def _marker_components(mask: np.ndarray, edge: np.ndarray, cfg: HoVerPostConfig, mpp: float,
                       mask_has_no_holes: bool) -> tuple[np.ndarray, np.ndarray]:
    seed = mask & (edge < cfg.marker_threshold)
    seed = _fill_holes_inside(seed, mask) if mask_has_no_holes else _fill_holes(seed) & mask
    seed = binary_open_disk(seed, cfg.marker_open_radius_um / mpp)
    return _small_components(seed, cfg.min_marker_area_um2 / mpp**2)


def _blur_weights(sigma_px: float) -> np.ndarray:
    r = int(_BLUR_TRUNCATE_SIGMAS * sigma_px + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2) if sigma_px > 0 else np.ones(1)
    return w / w.sum()


def watershed_surface(mask: np.ndarray, edge: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """``(H, W) float32`` relief ``-gaussian((1 - edge) * mask, cfg.surface_blur_um)``: basins at nucleus centres."""
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    edge = _check_float(_check_2d(edge, "edge", mask.shape), "edge")
    weights = _blur_weights(cfg.surface_blur_um / _check_mpp(mpp))
    return _blur(np.where(mask, edge - 1.0, 0.0).astype(np.float32), weights)


def _blur(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    for axis in (0, 1) if weights.size > 1 else ():
        x = ndi.correlate1d(x, weights, axis=axis, mode="mirror")
    return x


def watershed(mask: np.ndarray, marker_map: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Step 4. Marker-controlled watershed of ``surface`` inside ``mask`` → ``(H, W) uint32`` ids 1..N.

    ``mask (H, W) bool``, ``marker_map (H, W)`` non-negative int labels (0 = none; outside the mask ignored),
    ``surface (H, W)`` float. Equals ``skimage.segmentation.watershed(surface, marker_map, mask=mask)``
    (4-connected) with ids renumbered 1..N in marker-id order; mask components without a marker stay 0.
    """
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    marker_map = _check_2d(marker_map, "marker_map", mask.shape)
    surface = _check_float(_check_2d(surface, "surface", mask.shape), "surface")
    if not np.issubdtype(marker_map.dtype, np.integer) or marker_map.min() < 0:
        raise ValueError(f"marker_map must hold non-negative integer labels, got dtype {marker_map.dtype}")
    comp, n = ndi.label(mask)
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    return _flood_components(comp, keep, np.where(mask, marker_map, 0), None, lambda box: surface[box], np.ones(1))


def _flood_components(comp: np.ndarray, keep_comp: np.ndarray, mk: np.ndarray, keep_mk: np.ndarray | None,
                      raw_of: Callable[[Box], np.ndarray], weights: np.ndarray,
                      first_index: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Watershed per mask component (labels ``comp``, kept where ``keep_comp``) from markers ``mk`` inside them
    (kept where ``keep_mk``; None = all), renumbered 1..M in id order. A component holding one marker becomes that
    marker; those holding several are flooded together in a mosaic (:func:`_flood_mosaic`). The relief is
    ``raw_of(box)`` blurred with the 1D ``weights`` along both axes.

    ``first_index=True`` also returns the flat index of each output id's first marker pixel ``(M,)``; this needs
    marker ids numbered in raster order of their first pixel (as ``ndi.label`` numbers them).
    """
    idx = np.flatnonzero(mk)
    ids, comp_ids = mk.ravel()[idx].astype(np.int64), comp.ravel()[idx]
    ok = keep_comp[comp_ids] if keep_mk is None else keep_comp[comp_ids] & keep_mk[ids]
    present = np.zeros(keep_mk.size if keep_mk is not None else int(ids.max(initial=0)) + 1, dtype=bool)
    present[ids[ok]] = True
    relabel = (np.cumsum(present) * present).astype(np.int32)  # kept marker ids → 1..M in order
    m, n = int(present.sum()), keep_comp.size - 1
    comp_of = np.zeros(m + 1, dtype=np.int64)
    comp_of[relabel[ids[ok]]] = comp_ids[ok]
    per_comp = np.bincount(comp_of[1:], minlength=n + 1)
    lut = np.zeros(n + 1, dtype=np.uint32)
    single = per_comp[comp_of[1:]] == 1
    lut[comp_of[1:][single]] = np.arange(1, m + 1, dtype=np.uint32)[single]
    out = lut[comp]
    multi = np.flatnonzero(per_comp > 1)
    if multi.size:
        _flood_mosaic(out, comp, multi, lambda box: relabel[mk[box]], raw_of, weights)
    if not first_index:
        return out
    new = np.ones(ids.size, dtype=bool)  # first pixel of each marker: where the running maximum of ids grows
    new[1:] = ids[1:] > np.maximum.accumulate(ids)[:-1]
    first = np.zeros(present.size, dtype=np.int64)
    first[ids[new]] = idx[new]
    return out, first[present]


def _flood_mosaic(out: np.ndarray, comp: np.ndarray, multi: np.ndarray, seeds_of: Callable[[Box], np.ndarray],
                  raw_of: Callable[[Box], np.ndarray], weights: np.ndarray) -> None:
    """Flood components ``multi`` with one skimage call on a mosaic of their boxes, each grown by the blur radius
    (mirrored beyond the image) so the relief is exact; components never interact, so this equals flooding the
    whole image. Writes the result into ``out``."""
    r = weights.size // 2
    slices = ndi.find_objects(comp, max_label=int(multi.max()))
    boxes = [slices[c - 1] for c in multi]
    corners, shape = _shelf_pack([(b[0].stop - b[0].start + 2 * r, b[1].stop - b[1].start + 2 * r) for b in boxes])
    raw, seeds, inside = np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, bool)
    placed = []
    for c, box, (y, x) in zip(multi, boxes, corners, strict=True):
        sub = comp[box] == c
        grown = [(b.start - r, b.stop + r, size) for b, size in zip(box, comp.shape, strict=True)]
        crop = raw_of(tuple(slice(max(lo, 0), min(hi, size)) for lo, hi, size in grown))
        pads = [(max(0, -lo), max(0, hi - size)) for lo, hi, size in grown]
        raw[y:y + sub.shape[0] + 2 * r, x:x + sub.shape[1] + 2 * r] = \
            np.pad(crop, pads, mode="reflect") if any(map(any, pads)) else crop
        win = (slice(y + r, y + r + sub.shape[0]), slice(x + r, x + r + sub.shape[1]))
        inside[win], seeds[win] = sub, np.where(sub, seeds_of(box), 0)
        placed.append((box, sub, win))
    flooded = _sk_watershed(_blur(raw, weights), seeds, mask=inside)
    for box, sub, win in placed:
        out[box][sub] = flooded[win][sub]


def _shelf_pack(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Place boxes ``(h, w)`` on shelves with 1-pixel gaps: (top-left corner of each box, mosaic shape)."""
    width = max(max(w for _, w in shapes), int(math.sqrt(sum((h + 1) * (w + 1) for h, w in shapes))) + 1)
    corners = [(0, 0)] * len(shapes)
    row = col = shelf = 0
    for i in sorted(range(len(shapes)), key=lambda i: -shapes[i][0]):
        h, w = shapes[i]
        if col + w > width:
            row, col, shelf = row + shelf + 1, 0, 0
        corners[i] = (row, col)
        col, shelf = col + w + 1, max(shelf, h)
    return corners, (row + shelf, width)


# ------------------------------------------------------------------------------------------------ composition


class HoVerPostProcessor:
    """NP + HV (+ NC) maps → ``(instances (H, W) uint32, table)``; every threshold comes from ``cfg``.

    ``np_prob (H, W)`` float in [0, 1]; ``hv (2, H, W)`` float (horizontal, vertical), nominally in [-1, 1];
    ``mpp`` µm per pixel of these maps; ``nc_prob (C, H, W)`` optional type probabilities (channel 0 =
    background). The table is described in :func:`instance_table`.
    """

    def __init__(self, cfg: HoVerPostConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else HoVerPostConfig()

    def instances(self, np_prob: np.ndarray, hv: np.ndarray, mpp: float) -> np.ndarray:
        """Instance map only: ``(H, W) uint32``, 0 = background, ids 1..N."""
        mpp = _check_mpp(mpp)
        hv = _check_hv(hv, _check_2d(np.asarray(np_prob), "np_prob").shape)
        if self.cfg.threads > 1:
            # one worker computes the edge map while this thread labels the mask (two busy threads on two cores;
            # a third would only make them take turns)
            future = _pool().submit(hv_edge_map, hv, self.cfg, mpp)
            try:
                mask, comp, keep = _mask_components(np_prob, self.cfg, mpp)
            finally:
                edge = future.result()
        else:
            mask, comp, keep = _mask_components(np_prob, self.cfg, mpp)  # small objects are dropped when flooding
            edge = hv_edge_map(hv, self.cfg, mpp)
        weights = _blur_weights(self.cfg.surface_blur_um / mpp)
        raw = lambda box: np.where(keep[comp[box]], edge[box] - 1.0, 0.0).astype(np.float32)  # noqa: E731
        halo = max(int(self.cfg.marker_open_radius_um / mpp), weights.size // 2) + 2
        split = _split_rows(comp, keep.size - 1, halo) if self.cfg.threads > 1 and self.cfg.fill_mask_holes else None
        if split is None:
            mk, keep_mk = _marker_components(mask, edge, self.cfg, mpp, self.cfg.fill_mask_holes)
            return _flood_components(comp, keep, mk, keep_mk, raw, weights)
        part = lambda p: _segment_part(comp, keep, edge, raw, p, self.cfg, mpp, weights)  # noqa: E731
        lower = _pool().submit(part, split[1])  # the lower half in a worker thread, the upper one here
        try:
            upper = part(split[0])
        finally:
            lower = lower.result()
        return _merge_parts(comp.shape, [upper, lower])

    def __call__(self, np_prob: np.ndarray, hv: np.ndarray, mpp: float,
                 nc_prob: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        if nc_prob is not None:
            _check_nc(nc_prob, np.shape(np_prob))
        inst = self.instances(np_prob, hv, mpp)
        return inst, instance_table(inst, nc_prob, threads=self.cfg.threads)


# ------------------------------------------------------------------------------------------------ two halves
#
# Markers and the watershed only ever look inside one mask component (markers lie in it, the opening and the
# hole filling stay in it, the flood is confined to it), plus the relief blur radius around it. So the components
# can be split into an upper and a lower group processed in two threads (scipy's labelling and skimage's watershed
# release the GIL) and merged: ids are renumbered by the raster position of each instance's first marker pixel,
# which is the order of the single-threaded path, so the result is identical.

Part = tuple[int, int, int, int]  # (first row, end row) of the crop, components (lo, hi]


def _split_rows(comp: np.ndarray, n: int, halo: int) -> tuple[Part, Part] | None:
    """Split mask components ``comp`` (labels 1..n in raster order of their first pixel, as ``ndi.label`` numbers them)
    at the middle row: the upper part holds labels ``1..k`` (first pixel above the middle), the lower part the rest.
    Each part's crop is its rows plus ``halo`` rows of context. None when a split is pointless."""
    h = comp.shape[0]
    mid = h // 2
    if h < 8 * halo or n < 2:
        return None
    k = int(comp[:mid].max(initial=0))
    if k == 0 or k == n:
        return None
    tail = comp[mid:]
    below = np.flatnonzero(((tail > 0) & (tail <= k)).any(axis=1))
    upper_end = mid + (int(below[-1]) + 1 if below.size else 0)
    return (0, min(h, upper_end + halo), 0, k), (max(0, mid - halo), h, k, n)


def _segment_part(comp: np.ndarray, keep: np.ndarray, edge: np.ndarray, raw_of: Callable[[Box], np.ndarray],
                  part: Part, cfg: HoVerPostConfig, mpp: float,
                  weights: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Markers + watershed of the components ``(lo, hi]`` inside rows ``r0:r1``: (r0, instances of the crop with
    ids 1..M, global flat index of each instance's first marker pixel (M,))."""
    r0, r1, lo, hi = part
    c = comp[r0:r1]
    inside = (c > lo) & (c <= hi)
    mk, keep_mk = _marker_components(inside, edge[r0:r1], cfg, mpp, True)
    shifted = lambda box: raw_of((slice(box[0].start + r0, box[0].stop + r0), box[1]))  # noqa: E731
    # the other part's components hold no markers here, so they stay 0 without masking them out of ``c``
    out, first = _flood_components(c, keep, mk, keep_mk, shifted, weights, first_index=True)
    return r0, out, first + r0 * comp.shape[1]


def _merge_parts(shape: tuple[int, int], parts: list[tuple[int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Paste part results (disjoint instances) into one ``(H, W) uint32`` map, ids ordered by first marker pixel."""
    rank = np.empty(sum(p[2].size for p in parts), dtype=np.uint32)
    rank[np.argsort(np.concatenate([p[2] for p in parts]), kind="stable")] = np.arange(1, rank.size + 1)
    out = np.zeros(shape, dtype=np.uint32)
    start = 0
    for r0, inst, first in parts:
        lut = np.zeros(first.size + 1, dtype=np.uint32)
        lut[1:] = rank[start:start + first.size]
        start += first.size
        region = out[r0:r0 + inst.shape[0]]
        np.add(region, lut[inst], out=region)  # the parts' instances are disjoint
    return out


# ------------------------------------------------------------------------------------------------ table


def _pixels(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground pixels of an instance map: (flat index, label 1..N per pixel, the N original ids)."""
    idx = np.flatnonzero(inst)
    lab = inst.ravel()[idx]
    if lab.size == 0:
        return idx, lab.astype(np.intp), lab.astype(np.int64)
    if int(lab.max()) > 4 * lab.size + 1024:  # sparse huge ids
        ids, inverse = np.unique(lab, return_inverse=True)
        return idx, inverse.astype(np.intp) + 1, ids
    counts = np.bincount(lab)
    ids = np.flatnonzero(counts)
    lut = np.zeros(counts.size, dtype=np.intp)
    lut[ids] = np.arange(1, ids.size + 1)
    return idx, lut[lab], ids


def instance_table(instances: np.ndarray, nc_prob: np.ndarray | None = None, *, threads: int = 1) -> dict:
    """Per-nucleus table of an ``(H, W)`` integer instance map (0 = background), as a dict of columns.

    ``id`` (N,) uint32 instance ids, ascending; ``centroid_row``, ``centroid_col`` (N,) float64;
    ``bbox`` (N, 4) int64 ``(min_row, min_col, max_row, max_col)``, max exclusive (skimage convention);
    ``area_px`` (N,) int64; ``contour`` list of N ``(K, 2) float64`` closed (row, col) outer boundaries: the
    level-0.5 contour of the nucleus mask, as ``skimage.measure.find_contours`` on its crop (nuclei are
    4-connected; with several pieces the largest is taken). With ``nc_prob (C, H, W)``: ``type`` (N,) int64, the
    most frequent non-background per-pixel argmax type in the nucleus (0 only if all pixels are background), and
    ``type_prob`` (N,) float32, the mean probability of that type over the nucleus. ``threads >= 2`` traces the
    contours in a worker thread while the other columns are computed (same table).
    """
    inst = _check_instances(instances)
    nc = _check_nc(nc_prob, inst.shape) if nc_prob is not None else None
    idx, lab, ids = _pixels(inst)
    n = ids.size
    rows, cols = np.divmod(idx, inst.shape[1])
    area = np.bincount(lab, minlength=n + 1)[1:]
    seq = np.zeros(inst.shape, dtype=np.int32)
    seq.ravel()[idx] = lab
    contours = _pool().submit(_outer_contours, seq, rows, cols, n) if threads > 1 and n else None
    try:
        table = dict(id=ids.astype(np.uint32), area_px=area.astype(np.int64),
                     centroid_row=np.bincount(lab, rows, minlength=n + 1)[1:] / np.maximum(area, 1),
                     centroid_col=np.bincount(lab, cols, minlength=n + 1)[1:] / np.maximum(area, 1),
                     bbox=np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop]
                                    for s in ndi.find_objects(seq, n)], dtype=np.int64).reshape(n, 4))
        if nc is not None:
            _type_columns(table, nc, idx, lab, area, n)
    finally:
        traced = contours.result() if contours is not None else None
    table["contour"] = traced if contours is not None else _outer_contours(seq, rows, cols, n)
    return table


def _type_columns(table: dict, nc: np.ndarray, idx: np.ndarray, lab: np.ndarray, area: np.ndarray, n: int) -> None:
    """``type`` and ``type_prob`` columns of :func:`instance_table` from ``nc (C, H, W)``."""
    c = nc.shape[0]
    probs = nc.reshape(c, -1)[:, idx]  # (C, P) at the nuclear pixels
    counts = np.bincount(lab * c + probs.argmax(0), minlength=(n + 1) * c).reshape(n + 1, c)[1:, 1:]
    typ = np.where(counts.sum(1) > 0, counts.argmax(1) + 1, 0)
    mean = np.bincount(lab, probs[typ[lab - 1], np.arange(idx.size)], minlength=n + 1)[1:] / np.maximum(area, 1)
    table.update(type=typ.astype(np.int64), type_prob=mean.astype(np.float32))


# side k of a pixel, clockwise on screen: 0 top, 1 right, 2 bottom, 3 left
_ALONG = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]])  # direction a boundary edge on side k is walked
_OUTWARD = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]])  # from the pixel across side k


def _outer_contours(seq: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> list[np.ndarray]:
    """Contours of labels 1..n of ``seq (H, W) int32`` (foreground at ``rows``, ``cols``) by walking the crack
    edges between each label and the rest, all labels at once.

    Vertices are crack midpoints (= marching squares at 0.5 on the binary mask); at diagonal contacts the walk
    turns to keep the label 4-connected (``find_contours``' default). Each label keeps its largest outer loop.
    """
    if n == 0:
        return []
    lab = np.pad(seq, 1)
    flat, width = lab.ravel(), lab.shape[1]
    along, outward = _ALONG @ [width, 1], _OUTWARD @ [width, 1]
    fg = (rows + 1) * width + cols + 1
    pix = [fg[flat[fg + outward[k]] != flat[fg]] for k in range(4)]
    key = np.sort(np.concatenate([p * 4 + k for k, p in enumerate(pix)]))
    pix, side = np.divmod(key, 4)
    own, ahead = flat[pix], pix + along[side]  # the pixel next along the walk
    corner = ahead + outward[side]  # diagonally ahead, outside
    nxt = np.where(flat[ahead] != own, pix * 4 + (side + 1) % 4,  # turn right around the same pixel
                   np.where(flat[corner] == own, corner * 4 + (side + 3) % 4, ahead * 4 + side))
    succ = np.searchsorted(key, nxt)
    loop, order = _walk_loops(succ)
    mid = np.stack(np.divmod(pix, width), 1) - 1 + 0.5 * _OUTWARD[side]
    cross = mid[:, 1] * mid[succ, 0] - mid[:, 0] * mid[succ, 1]  # shoelace: > 0 outer loop, < 0 around a hole
    area = np.bincount(loop, cross)
    start = np.flatnonzero(np.r_[True, loop[order][1:] != loop[order][:-1]])  # first edge of each loop in order
    bounds = np.r_[start, order.size]
    loop_label = own[order[start]]
    pick = np.lexsort((-area[loop[order[start]]], loop_label))
    pick = pick[np.r_[True, loop_label[pick][1:] != loop_label[pick][:-1]]]  # best loop per label, label order
    lo, length = bounds[pick], bounds[pick + 1] - bounds[pick]  # each picked loop, closed by its first vertex
    ends = np.cumsum(length + 1)
    pos = np.arange(int(ends[-1])) - np.repeat(ends - length - 1, length + 1)  # 0..length per loop
    pos[ends - 1] = 0
    closed = mid[order[np.repeat(lo, length + 1) + pos]]
    return np.split(closed, ends[:-1])


def _walk_loops(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cycles of the permutation ``succ`` by pointer jumping: (cycle id per element = its smallest member,
    all elements ordered cycle by cycle, each cycle walked from its smallest member)."""
    e = np.arange(succ.size)
    rep, jump = e.copy(), succ.copy()
    steps = max(1, int(succ.size).bit_length())
    for _ in range(steps):
        rep, jump = np.minimum(rep, rep[jump]), jump[jump]
    link = np.where(succ == rep, e, succ)  # the last element of each cycle stops
    dist = (link != e).astype(np.int64)
    for _ in range(steps):
        dist, link = dist + dist[link], link[link]
    return rep, np.lexsort((dist[rep] - dist, rep))


# ------------------------------------------------------------------------------------------------ targets


def hv_targets(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net training targets: ``instances (H, W)`` integer map → ``hv (2, H, W) float32`` in [-1, 1].

    Channel 0: horizontal (column) offset of each nuclear pixel from its nucleus' centre of mass; channel 1:
    vertical (row) offset. Negative and positive offsets are divided separately by their largest magnitude in the
    nucleus (hover_net ``gen_instance_hv_map``); 0 outside nuclei. Unlike hover_net the centre of mass is not
    rounded and the grid is not shifted by one pixel, so a symmetric nucleus gets an antisymmetric map.
    """
    inst = _check_instances(instances)
    h, w = inst.shape
    out = np.zeros((2, h * w), dtype=np.float32)
    idx, lab, ids = _pixels(inst)
    n = ids.size
    if n == 0:
        return out.reshape(2, h, w)
    rows, cols = np.divmod(idx, w)
    area = np.bincount(lab, minlength=n + 1)
    for ch, coord in ((0, cols), (1, rows)):
        com = np.bincount(lab, coord, minlength=n + 1) / np.maximum(area, 1)
        lo = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(n + 1, -1, dtype=np.int64)
        np.minimum.at(lo, lab, coord)
        np.maximum.at(hi, lab, coord)
        d = coord - com[lab]
        scale = np.where(d < 0, (com - lo)[lab], (hi - com)[lab])
        out[ch, idx] = d / np.where(scale > 0, scale, 1.0)
    return out.reshape(2, h, w)


# ------------------------------------------------------------------------------------------ large objects


def object_factor(cfg: ObjectPostConfig, mpp: float) -> int:
    """Integer down-sampling factor from ``mpp`` to ``cfg.work_mpp_um`` (1 = work at the mask's resolution)."""
    mpp = _check_mpp(mpp)
    return max(1, int(math.floor(cfg.work_mpp_um / mpp + 1e-6))) if cfg.work_mpp_um > 0 else 1


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """``(H, W) bool`` → ``(ceil(H/f), ceil(W/f)) bool``: a coarse pixel is set when at least half of its block
    (the part inside the image, at the right and bottom edges) is set."""
    mask = np.asarray(mask, dtype=bool)
    if factor == 1:
        return mask.copy()
    h, w = mask.shape
    hc, wc = -(-h // factor), -(-w // factor)
    padded = np.zeros((hc * factor, wc * factor), bool)
    padded[:h, :w] = mask
    count = padded.reshape(hc, factor, wc, factor).sum((1, 3), dtype=np.int32)
    rows = np.minimum(factor, h - np.arange(hc) * factor)
    cols = np.minimum(factor, w - np.arange(wc) * factor)
    return 2 * count >= rows[:, None] * cols[None, :]


def objects_at(mask: np.ndarray, cfg: ObjectPostConfig, mpp: float) -> np.ndarray:
    """The object rules of :func:`object_instances` run on ``mask`` at its own resolution ``mpp`` → ``uint32``."""
    from skimage.morphology import h_maxima

    mask = _check_2d(mask, "mask").astype(bool)
    mpp = _check_mpp(mpp)
    if cfg.fill_holes:
        mask = _fill_holes(mask)
    lab, keep = _small_components(mask, cfg.min_object_area_um2 / mpp**2)
    if cfg.split_depth_um <= 0:
        return _drop(lab, keep).astype(np.uint32)
    mask = keep[lab]
    if not mask.any():
        return np.zeros(mask.shape, np.uint32)
    dist = ndi.distance_transform_edt(mask).astype(np.float32) * np.float32(mpp)
    if cfg.smooth_um > 0:
        dist = ndi.gaussian_filter(dist, cfg.smooth_um / mpp)
    fm = max(1, int(math.floor(cfg.marker_mpp_um / mpp + 1e-6))) if cfg.marker_mpp_um > 0 else 1
    if fm > 1:  # markers on a sub-sampled grid (the smoothed distance is slowly varying), placed back at full res
        coarse = h_maxima(np.ascontiguousarray(dist[::fm, ::fm]), cfg.split_depth_um) & mask[::fm, ::fm]
        seeds = np.zeros(mask.shape, np.int32)
        seeds[::fm, ::fm] = ndi.label(coarse)[0]
    else:
        seeds = ndi.label(h_maxima(dist, cfg.split_depth_um) & mask)[0]
    out = _sk_watershed(-dist, seeds, mask=mask).astype(np.uint32)
    rest = mask & (out == 0)  # objects with no maximum that deep: one instance each
    if rest.any():
        extra, _ = ndi.label(rest)
        out[rest] = extra[rest].astype(np.uint32) + out.max()
    return out


class CoarseObjects:
    """Object instances found on a coarse grid (``factor`` × the fine pixel), to paint back at full resolution
    block by block: :meth:`paint` gives the labels of any fine-resolution block from its own mask. A fine pixel gets
    the label of its coarse pixel (labels grown by one coarse pixel into the background first, so the fine
    object's rim outside the coarse one is kept) when the fine mask is set there, or when the coarse pixel is a
    filled hole (lumen) of that object. Neighbouring objects never overwrite each other."""

    def __init__(self, coarse_mask: np.ndarray, cfg: ObjectPostConfig, coarse_mpp: float, factor: int) -> None:
        from skimage.segmentation import expand_labels

        self.factor = int(factor)
        core = objects_at(coarse_mask, cfg, coarse_mpp)
        self.labels = expand_labels(core, 1).astype(np.uint32) if self.factor > 1 else core
        self.hole = (core > 0) & ~np.asarray(coarse_mask, dtype=bool)
        self.n = int(core.max())

    def paint(self, fine_mask: np.ndarray, row0: int = 0, col0: int = 0) -> np.ndarray:
        """``uint32`` labels of the fine block ``fine_mask`` whose top-left pixel is (``row0``, ``col0``)."""
        fine_mask = np.asarray(fine_mask, dtype=bool)
        if self.factor == 1:
            return self.labels[row0:row0 + fine_mask.shape[0], col0:col0 + fine_mask.shape[1]].copy()
        r = (row0 + np.arange(fine_mask.shape[0])) // self.factor
        c = (col0 + np.arange(fine_mask.shape[1])) // self.factor
        lab = self.labels[r[:, None], c[None, :]]
        keep = fine_mask | self.hole[r[:, None], c[None, :]]
        return np.where(keep, lab, 0).astype(np.uint32)


def object_instances(mask: np.ndarray, cfg: ObjectPostConfig, mpp: float) -> np.ndarray:
    """Instances of large objects (glands) from a binary foreground ``mask (H, W)`` at ``mpp`` µm/px → ``uint32``.

    Holes are filled (``cfg.fill_holes``), 4-connected objects smaller than ``cfg.min_object_area_um2`` removed, and
    objects that touch through a neck are split by a marker watershed on the distance transform (in µm, smoothed
    with ``cfg.smooth_um``), whose markers are the maxima at least ``cfg.split_depth_um`` deep. An object without
    such a maximum (thinner than the depth) stays one instance; none is ever dropped after the size filter.
    These rules run on a grid of about ``cfg.work_mpp_um`` µm/px (an integer multiple of ``mpp``; the mask is
    down-sampled by majority) and the labels are painted back at ``mpp`` (:class:`CoarseObjects`): the cost then
    scales with the area in µm², not with the pixel count, and a whole slide's mask never has to be in memory.
    With ``cfg.marker_mpp_um`` > 0 the split markers are searched on a grid that coarse (the smoothed distance
    transform varies slowly; 3x faster) and the watershed runs at the working resolution.
    """
    mask = _check_2d(mask, "mask").astype(bool)
    mpp = _check_mpp(mpp)
    f = object_factor(cfg, mpp)
    if f == 1:
        return objects_at(mask, cfg, mpp)
    return CoarseObjects(downsample_mask(mask, f), cfg, mpp * f, f).paint(mask)


OBJECT_COLUMNS = ("id", "class", "class_name", "centroid_row", "centroid_col", "bbox_min_row", "bbox_min_col",
                  "bbox_max_row", "bbox_max_col", "area_px", "area_um2")


class ObjectStats:
    """Per-object table of a label map accumulated block by block (a slide's objects are painted in row strips):
    area, centroid, bounding box and the object's class — the most frequent non-background class of the semantic
    map over its pixels (0 where the object is only a filled hole)."""

    def __init__(self, n_objects: int, n_classes: int) -> None:
        self.n, self.c = int(n_objects), max(int(n_classes), 1)
        self.area = np.zeros(self.n + 1, np.int64)
        self.sum_r = np.zeros(self.n + 1, np.float64)
        self.sum_c = np.zeros(self.n + 1, np.float64)
        big = np.iinfo(np.int64).max
        self.lo = np.full((self.n + 1, 2), big, np.int64)
        self.hi = np.full((self.n + 1, 2), -1, np.int64)
        self.classes = np.zeros((self.n + 1, self.c), np.int64)

    def add(self, labels: np.ndarray, semantic: np.ndarray, row0: int = 0, col0: int = 0) -> None:
        """Count the block ``labels (h, w)`` with its ``semantic (h, w)`` classes; its top-left is (row0, col0)."""
        idx = np.flatnonzero(labels)
        if idx.size == 0:
            return
        lab = labels.ravel()[idx].astype(np.intp)
        if int(lab.max()) > self.n:
            raise ValueError(f"object label {int(lab.max())} > the {self.n} objects announced")
        rows, cols = np.divmod(idx, labels.shape[1])
        rows, cols = rows + row0, cols + col0
        n1 = self.n + 1
        self.area += np.bincount(lab, minlength=n1)
        self.sum_r += np.bincount(lab, rows, minlength=n1)
        self.sum_c += np.bincount(lab, cols, minlength=n1)
        np.minimum.at(self.lo, (lab, 0), rows)
        np.minimum.at(self.lo, (lab, 1), cols)
        np.maximum.at(self.hi, (lab, 0), rows)
        np.maximum.at(self.hi, (lab, 1), cols)
        sem = np.minimum(semantic.ravel()[idx].astype(np.intp), self.c - 1)
        self.classes += np.bincount(lab * self.c + sem, minlength=n1 * self.c).reshape(n1, self.c)

    def table(self) -> dict:
        """Columns of the objects present (area > 0), ids ascending: ``id``, ``class``, ``centroid_row``,
        ``centroid_col``, ``bbox (N, 4)`` (min_row, min_col, max_row, max_col; max exclusive), ``area_px``."""
        ids = np.flatnonzero(self.area[1:]) + 1
        fg = self.classes[ids, 1:]
        cls = np.where(fg.sum(1) > 0, fg.argmax(1) + 1, 0) if self.c > 1 else np.zeros(ids.size, np.int64)
        area = self.area[ids]
        return dict(id=ids.astype(np.uint32), **{"class": cls.astype(np.int64)},
                    centroid_row=self.sum_r[ids] / area, centroid_col=self.sum_c[ids] / area,
                    bbox=np.concatenate([self.lo[ids], self.hi[ids] + 1], axis=1).reshape(-1, 4),
                    area_px=area)


def object_table(objects: np.ndarray, semantic: np.ndarray, n_classes: int) -> dict:
    """:class:`ObjectStats` table of a whole in-memory object map ``(H, W)`` and its semantic classes."""
    objects = _check_instances(objects)
    stats = ObjectStats(int(objects.max()) if objects.size else 0, n_classes)
    stats.add(objects, np.asarray(semantic))
    return stats.table()
