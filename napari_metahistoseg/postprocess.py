"""HoVer-Net post-processing: NP + HV maps → nucleus instances and a per-nucleus table; and HV training targets.

Small single-purpose steps (as in MONAI's HoVer-Net transforms), composed by :class:`HoVerPostProcessor`:

1. :func:`watershed_mask`  ``np_prob (H, W) float32`` → ``(H, W) bool`` nuclear mask
2. :func:`hv_edge_map`     ``hv (2, H, W) float32`` → ``(H, W) float32`` edge strength in [0, 1]
3. :func:`markers`         mask + edge → ``(H, W) int32`` labelled markers
4. :func:`watershed_surface`, :func:`watershed` → ``(H, W) uint32`` instances, ids 1..N

The algorithm is the hover_net repository's ``__proc_np_hv`` with every constant a :class:`HoVerPostConfig` field
in µm (converted with the image's µm/pixel). Differences: the NP mask can have its holes filled; the marker
opening uses a disk (hover_net: a 5x5 ellipse); mask components holding a single marker are assigned to it
directly, and only components with several markers go through the (identical) marker watershed.
``hv[0]`` is the horizontal map (x, along columns), ``hv[1]`` the vertical map (y, along rows).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage.measure import find_contours
from skimage.segmentation import watershed as _sk_watershed

from napari_metahistoseg.config import HoVerPostConfig

_BLUR_TRUNCATE_SIGMAS = 1.5  # support of the surface blur in sigmas (radius 1 px at hover_net's 0.8 px sigma)
_BAND_BLOCK_PX = 8  # output rows/columns per matrix product in the banded (Sobel) correlation
_BAND_PRODUCT_MNK = 1 << 18  # size bound of each product: small GEMMs stay single-threaded in OpenBLAS, whose
#                             threads thrash on a busy machine (and it is as fast for these thin products)

# ------------------------------------------------------------------------------------------------ checks


def _check_mpp(mpp: float) -> float:
    if not isinstance(mpp, (int, float, np.floating)) or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp (µm per pixel) must be a finite number > 0, got {mpp!r}")
    return float(mpp)


def _check_2d(a: np.ndarray, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty (H, W) array, got shape {a.shape}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
    return a


def _check_float(a: np.ndarray, name: str, lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    amin, amax = float(a.min()), float(a.max())  # nan propagates and fails the comparison
    if not (lo <= amin and amax <= hi and math.isfinite(amin) and math.isfinite(amax)):
        raise ValueError(f"{name} must be finite and within [{lo}, {hi}], got range [{amin}, {amax}]")
    return a


def _check_hv(hv: np.ndarray) -> np.ndarray:
    hv = np.asarray(hv)
    if hv.ndim != 3 or hv.shape[0] != 2 or 0 in hv.shape:
        raise ValueError(f"hv must be a (2, H, W) array (horizontal, vertical), got shape {hv.shape}")
    return _check_float(hv, "hv")


def _px_area(area_um2: float, mpp: float) -> float:
    return area_um2 / (mpp * mpp)


def sobel_size_px(size_um: float, mpp: float) -> int:
    """Sobel kernel size in pixels: ``size_um / mpp`` rounded to the nearest odd integer, at least 3."""
    return max(3, 2 * int(math.floor((size_um / _check_mpp(mpp) - 1) / 2 + 0.5)) + 1)


# ------------------------------------------------------------------------------------------------ morphology


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``binary_fill_holes`` (4-connected background) via one labelling of the background."""
    bg, n = ndi.label(~mask)
    outside = np.zeros(n + 1, dtype=bool)
    for edge in (bg[0], bg[-1], bg[:, 0], bg[:, -1]):
        outside[edge] = True
    outside[0] = True
    return mask | ~outside[bg]


def _remove_small(mask: np.ndarray, min_px: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop 4-connected components smaller than ``min_px``: returns (mask, component labels 1..n, n)."""
    lab, n = ndi.label(mask)
    if n == 0:
        return mask, lab, 0
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_px
    keep[0] = False
    if keep[1:].all():
        return mask, lab, n
    lut = np.zeros(n + 1, dtype=lab.dtype)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    lab = lut[lab]
    return lab > 0, lab, int(keep.sum())


def _segment_op(a: np.ndarray, half: int, axis: int, erode: bool) -> np.ndarray:
    """Binary erosion/dilation by a ``2*half+1`` segment along ``axis`` (log-doubling of shifted AND/OR)."""
    if half == 0:
        return a
    pad = [(0, 0), (0, 0)]
    pad[axis] = (half, half)
    acc = np.pad(a, pad, constant_values=erode)  # the border never erodes / never dilates
    op = np.logical_and if erode else np.logical_or
    span, length = 1, 2 * half + 1
    while span < length:
        step = min(span, length - span)
        n = acc.shape[axis]
        acc = op(_slice(acc, 0, n - step, axis), _slice(acc, step, n, axis))
        span += step
    return acc


def _slice(a: np.ndarray, start: int, stop: int, axis: int) -> np.ndarray:
    return a[start:stop] if axis == 0 else a[:, start:stop]


def _disk_rectangles(radius_px: float) -> list[tuple[int, int]]:
    """The disk ``r² + c² <= radius²`` as a union of centred rectangles ``(half_height, half_width)``."""
    top = int(math.floor(radius_px))
    widths = [int(math.floor(math.sqrt(radius_px**2 - j * j))) for j in range(top + 1)]
    return [(j, widths[j]) for j in range(top + 1) if j == top or widths[j] > widths[j + 1]]


def binary_open_disk(mask: np.ndarray, radius_px: float) -> np.ndarray:
    """Binary opening of ``(H, W) bool`` by a disk of ``radius_px``, decomposed into separable rectangles."""
    rects = _disk_rectangles(radius_px)
    if rects == [(0, 0)]:
        return mask
    eroded = np.logical_and.reduce(
        [_segment_op(_segment_op(mask, h, 0, True), w, 1, True) for h, w in rects])
    return np.logical_or.reduce(
        [_segment_op(_segment_op(eroded, h, 0, False), w, 1, False) for h, w in rects])


# ------------------------------------------------------------------------------------------------ steps


def watershed_mask(np_prob: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """Step 1. ``np_prob (H, W)`` float in [0, 1] → ``(H, W) bool`` nuclear mask.

    Pixels with probability ≥ ``cfg.np_threshold``; holes filled (``cfg.fill_mask_holes``); 4-connected objects
    smaller than ``cfg.min_object_area_um2`` removed.
    """
    return _mask_components(np_prob, cfg, mpp)[0]


def _mask_components(np_prob: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> tuple[np.ndarray, np.ndarray, int]:
    np_prob = _check_float(_check_2d(np_prob, "np_prob"), "np_prob", 0.0, 1.0)
    mask = np_prob >= cfg.np_threshold
    if cfg.fill_mask_holes:
        mask = _fill_holes(mask)
    return _remove_small(mask, _px_area(cfg.min_object_area_um2, _check_mpp(mpp)))


def sobel_kernels(size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's generalised Sobel kernels of odd ``size_px``: (binomial smoothing, derivative of binomial).

    ``smooth`` = binomial coefficients of order ``size_px - 1``; ``deriv`` = binomial of order ``size_px - 3``
    convolved with ``[-1, 0, 1]`` (correlation order, as ``cv2.getDerivKernels``). Both ``(size_px,) float64``,
    scaled to unit L1 norm (the edge map is min-max normalised, so the scale does not matter).
    """
    if size_px < 3 or size_px % 2 == 0:
        raise ValueError(f"Sobel kernel size must be an odd integer >= 3, got {size_px}")
    smooth = np.array([math.comb(size_px - 1, i) for i in range(size_px)], dtype=np.float64)
    base = np.array([math.comb(size_px - 3, i) for i in range(size_px - 2)], dtype=np.float64)
    deriv = np.convolve(base, [1.0, 0.0, -1.0])[::-1]  # [-1, ..., 0, ..., 1]
    return smooth / smooth.sum(), deriv / np.abs(deriv).sum()


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _correlate_banded(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """``scipy.ndimage.correlate1d(x, kernel, axis, mode="mirror")`` for ``(H, W) float32`` as small matrix
    products with a banded matrix (BLAS is several times faster than a direct 1D loop for long kernels)."""
    r = kernel.size // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    xp = np.pad(x, pad, mode="reflect")  # numpy "reflect" == scipy "mirror" == OpenCV BORDER_REFLECT_101
    block = min(_BAND_BLOCK_PX, x.shape[axis])
    band = np.zeros((block, block + 2 * r), np.float32)
    for i in range(block):
        band[i, i:i + kernel.size] = kernel
    chunk = max(1, _BAND_PRODUCT_MNK // band.size)  # along the other axis
    out = np.empty(x.shape, np.float32)
    for s in range(0, x.shape[axis], block):
        n = min(block, x.shape[axis] - s)
        win, rows = slice(s, s + n + 2 * r), slice(s, s + n)
        for c in range(0, x.shape[1 - axis], chunk):
            cc = slice(c, c + chunk)
            if axis == 0:
                np.matmul(band[:n, :n + 2 * r], xp[win, cc], out=out[rows, cc])
            else:
                np.matmul(xp[cc, win], band[:n, :n + 2 * r].T, out=out[cc, rows])
    return out


def hv_edge_map(hv: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """Step 2. ``hv (2, H, W)`` → ``(H, W) float32`` edge strength in [0, 1] (high between touching nuclei).

    hover_net: ``max(1 - minmax(Sobel_x(minmax(h))), 1 - minmax(Sobel_y(minmax(v))))`` with a Sobel of
    ``cfg.sobel_kernel_um``. The inner min-max normalisation is an affine map that the outer one cancels, so it
    is skipped. Image borders are mirrored (OpenCV's default BORDER_REFLECT_101).
    """
    hv = _check_hv(hv)
    smooth, deriv = (k.astype(np.float32) for k in sobel_kernels(sobel_size_px(cfg.sobel_kernel_um, mpp)))
    gx = _correlate_banded(_correlate_banded(hv[0], smooth, axis=0), deriv, axis=1)
    gy = _correlate_banded(_correlate_banded(hv[1], smooth, axis=1), deriv, axis=0)
    return np.maximum(1.0 - _minmax(gx), 1.0 - _minmax(gy))


def markers(mask: np.ndarray, edge: np.ndarray, cfg: HoVerPostConfig, mpp: float, *,
            mask_has_no_holes: bool = False) -> np.ndarray:
    """Step 3. ``mask (H, W) bool`` + ``edge (H, W) float`` → ``(H, W) int32`` markers labelled 1..M.

    hover_net: mask pixels with ``edge < cfg.marker_threshold``, holes filled, opened with a disk of
    ``cfg.marker_open_radius_um``, 4-connected markers smaller than ``cfg.min_marker_area_um2`` removed.
    ``mask_has_no_holes=True`` (e.g. a mask from :func:`watershed_mask` with ``cfg.fill_mask_holes``) allows a
    cheaper, equivalent hole filling.
    """
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    edge = _check_float(_check_2d(edge, "edge", mask.shape), "edge")
    mpp = _check_mpp(mpp)
    seed = mask & (edge < cfg.marker_threshold)
    seed = _fill_holes_inside(seed, mask) if mask_has_no_holes else _fill_holes(seed) & mask
    seed = binary_open_disk(seed, cfg.marker_open_radius_um / mpp)
    return _remove_small(seed, _px_area(cfg.min_marker_area_um2, mpp))[1].astype(np.int32, copy=False)


def _fill_holes_inside(seed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill holes of ``seed ⊂ mask`` when ``mask`` has none: a hole is a component of ``mask & ~seed`` that
    touches neither the outside of the mask nor the image border (everything outside the mask reaches the border).
    """
    rest, n = ndi.label(mask & ~seed)
    if n == 0:
        return seed
    rim = mask & ~_erode_cross(mask)
    open_ = np.bincount(rest[rim], minlength=n + 1) > 0
    open_[0] = True
    return seed | ~open_[rest]


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """4-neighbour erosion; pixels on the image border erode (the outside counts as background)."""
    out = np.zeros_like(mask)
    out[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    return out


def _surface_crop(mask: np.ndarray, edge: np.ndarray, sl: tuple[slice, slice], sigma: float) -> np.ndarray:
    """:func:`watershed_surface` evaluated on the box ``sl`` only (exactly: the blur reads a padded crop)."""
    r = int(_BLUR_TRUNCATE_SIGMAS * sigma + 0.5) if sigma > 0 else 0
    r0, c0 = max(sl[0].start - r, 0), max(sl[1].start - r, 0)
    padded = (slice(r0, sl[0].stop + r), slice(c0, sl[1].stop + r))
    inside = np.where(mask[padded], 1.0 - edge[padded], 0.0).astype(np.float32)
    if sigma > 0:
        inside = ndi.gaussian_filter(inside, sigma, mode="mirror", truncate=_BLUR_TRUNCATE_SIGMAS)
    dr, dc = sl[0].start - r0, sl[1].start - c0
    return -inside[dr:dr + sl[0].stop - sl[0].start, dc:dc + sl[1].stop - sl[1].start]


def watershed_surface(mask: np.ndarray, edge: np.ndarray, cfg: HoVerPostConfig, mpp: float) -> np.ndarray:
    """``(H, W) float32`` watershed relief: ``-blur((1 - edge) * mask)`` (basins at nucleus centres, hover_net)."""
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    edge = _check_float(_check_2d(edge, "edge", mask.shape), "edge")
    return _surface_crop(mask, edge, (slice(0, mask.shape[0]), slice(0, mask.shape[1])),
                         cfg.surface_blur_um / _check_mpp(mpp))


def watershed(mask: np.ndarray, marker_map: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Step 4. Marker-controlled watershed of ``surface`` inside ``mask`` → ``(H, W) uint32`` ids 1..N.

    ``mask (H, W) bool``, ``marker_map (H, W)`` int labels (0 = none; markers outside the mask are dropped),
    ``surface (H, W)`` float. The result equals ``skimage.segmentation.watershed(surface, markers, mask=mask)``
    (4-connected) with ids renumbered 1..N in marker-id order; mask components without a marker stay 0.
    """
    mask = _check_2d(mask, "mask").astype(bool, copy=False)
    marker_map = _check_2d(marker_map, "marker_map", mask.shape)
    surface = _check_float(_check_2d(surface, "surface", mask.shape), "surface")
    if not np.issubdtype(marker_map.dtype, np.integer) or (marker_map.size and marker_map.min() < 0):
        raise ValueError(f"marker_map must hold non-negative integer labels, got dtype {marker_map.dtype}")
    comp, n = ndi.label(mask)
    return _watershed_components(comp, n, np.where(mask, marker_map, 0), lambda sl: surface[sl])


def _watershed_components(comp: np.ndarray, n: int, mk: np.ndarray, surface_of) -> np.ndarray:
    """Watershed per mask component (``comp`` labels 1..n, markers ``mk`` inside them): a component with one
    marker becomes that marker; components with several are cut out, packed into one mosaic and flooded by a
    single skimage call (components are independent, so this equals flooding the whole image).
    ``surface_of(box)`` returns the relief on a bounding box.
    """
    idx = np.flatnonzero(mk)
    ids = mk.ravel()[idx].astype(np.int64)
    present = np.zeros(int(ids.max()) + 1 if ids.size else 1, dtype=bool)
    present[ids] = True
    relabel = (np.cumsum(present) * present).astype(np.int32)  # marker ids → 1..M in order
    m = int(present.sum())
    comp_of = np.zeros(m + 1, dtype=np.int64)
    comp_of[relabel[ids]] = comp.ravel()[idx]
    per_comp = np.bincount(comp_of[1:], minlength=n + 1)
    lut = np.zeros(n + 1, dtype=np.uint32)
    single = per_comp[comp_of[1:]] == 1
    lut[comp_of[1:][single]] = np.arange(1, m + 1, dtype=np.uint32)[single]
    out = lut[comp]
    multi = np.flatnonzero(per_comp > 1)
    if multi.size:
        slices = ndi.find_objects(comp, max_label=int(multi.max()))
        boxes = [slices[c - 1] for c in multi]
        corners, shape = _shelf_pack([(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes])
        relief = np.zeros(shape, np.float32)
        seeds = np.zeros(shape, np.int32)
        inside = np.zeros(shape, bool)
        subs = []
        for c, box, (r, q) in zip(multi, boxes, corners, strict=True):
            sub = comp[box] == c
            win = (slice(r, r + sub.shape[0]), slice(q, q + sub.shape[1]))
            inside[win], seeds[win], relief[win] = sub, np.where(sub, relabel[mk[box]], 0), surface_of(box)
            subs.append((sub, win))
        flooded = _sk_watershed(relief, seeds, mask=inside)
        for (sub, win), box in zip(subs, boxes, strict=True):
            out[box][sub] = flooded[win][sub]
    return out


def _shelf_pack(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Place boxes ``(h, w)`` on shelves with 1-pixel gaps: (top-left corner of each box, mosaic shape)."""
    width = max(max(w for _, w in shapes), int(math.sqrt(sum((h + 1) * (w + 1) for h, w in shapes))) + 1)
    corners: list[tuple[int, int]] = [(0, 0)] * len(shapes)
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
        mask, comp, n = _mask_components(np_prob, self.cfg, mpp)
        hv = _check_hv(hv)
        if hv.shape[1:] != mask.shape:
            raise ValueError(f"hv has shape {hv.shape}, expected (2, {mask.shape[0]}, {mask.shape[1]}) like np_prob")
        edge = hv_edge_map(hv, self.cfg, mpp)
        mk = markers(mask, edge, self.cfg, mpp, mask_has_no_holes=self.cfg.fill_mask_holes)
        sigma = self.cfg.surface_blur_um / mpp
        return _watershed_components(comp, n, mk, lambda box: _surface_crop(mask, edge, box, sigma))

    def __call__(self, np_prob: np.ndarray, hv: np.ndarray, mpp: float,
                 nc_prob: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        if nc_prob is not None:
            _check_nc(nc_prob, np.shape(np_prob))
        inst = self.instances(np_prob, hv, mpp)
        return inst, instance_table(inst, nc_prob)


# ------------------------------------------------------------------------------------------------ table


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


def _pixels(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Foreground pixels: (flat index, compact label 1..N per pixel, original ids (N,), N)."""
    idx = np.flatnonzero(inst)
    lab = inst.ravel()[idx]
    ids, lab = np.unique(lab, return_inverse=True) if lab.size and int(lab.max()) > 4 * idx.size + 1024 else \
        _dense_compact(lab)
    return idx, lab.astype(np.intp) + 1, ids, int(ids.size)


def _dense_compact(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if lab.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.intp)
    counts = np.bincount(lab)
    ids = np.flatnonzero(counts)
    if ids.size == ids[-1] and ids[0] == 1:  # already 1..N
        return ids, lab.astype(np.intp) - 1
    lut = np.zeros(counts.size, dtype=np.intp)
    lut[ids] = np.arange(ids.size)
    return ids, lut[lab]


def instance_table(instances: np.ndarray, nc_prob: np.ndarray | None = None) -> dict:
    """Per-nucleus table of an ``(H, W)`` integer instance map (0 = background), as a dict of columns.

    ``id`` (N,) uint32 instance id (ascending); ``centroid_row``, ``centroid_col`` (N,) float64;
    ``bbox`` (N, 4) int64 ``(min_row, min_col, max_row, max_col)`` with exclusive max (skimage convention);
    ``area_px`` (N,) int64; ``contour`` list of N ``(K, 2) float64`` closed (row, col) outer boundaries
    (``find_contours`` at level 0.5). With ``nc_prob (C, H, W)``: ``type`` (N,) int64 — the most frequent
    non-background per-pixel argmax type inside the nucleus (0 only if all its pixels are background) — and
    ``type_prob`` (N,) float32, the mean probability of that type over the nucleus.
    """
    inst = _check_instances(instances)
    nc = _check_nc(nc_prob, inst.shape) if nc_prob is not None else None
    idx, lab, ids, n = _pixels(inst)
    rows, cols = np.divmod(idx, inst.shape[1])
    area = np.bincount(lab, minlength=n + 1)[1:]
    table = dict(id=ids.astype(np.uint32), area_px=area.astype(np.int64),
                 centroid_row=np.bincount(lab, rows, minlength=n + 1)[1:] / np.maximum(area, 1),
                 centroid_col=np.bincount(lab, cols, minlength=n + 1)[1:] / np.maximum(area, 1))
    seq = np.zeros(inst.shape, dtype=np.int32)
    seq.ravel()[idx] = lab
    slices = ndi.find_objects(seq, max_label=n)
    table["bbox"] = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices],
                             dtype=np.int64).reshape(n, 4)
    table["contour"] = [_contour(seq[s] == i + 1, s) for i, s in enumerate(slices)]
    if nc is not None:
        table.update(_types(nc, idx, lab, n, area))
    return table


def _contour(crop: np.ndarray, sl: tuple[slice, slice]) -> np.ndarray:
    contours = find_contours(np.pad(crop, 1).astype(np.uint8), 0.5)
    longest = max(contours, key=len)
    return longest + np.array([sl[0].start - 1, sl[1].start - 1], dtype=np.float64)


def _types(nc: np.ndarray, idx: np.ndarray, lab: np.ndarray, n: int, area: np.ndarray) -> dict:
    c = nc.shape[0]
    probs = nc.reshape(c, -1)[:, idx]  # (C, P) at the nuclear pixels
    pix_type = probs.argmax(0)
    counts = np.bincount(lab * c + pix_type, minlength=(n + 1) * c).reshape(n + 1, c)[1:, 1:]
    typ = np.where(counts.sum(1) > 0, counts.argmax(1) + 1, 0)
    chosen = probs[typ[lab - 1], np.arange(idx.size)]
    mean = np.bincount(lab, chosen, minlength=n + 1)[1:] / np.maximum(area, 1)
    return dict(type=typ.astype(np.int64), type_prob=mean.astype(np.float32))


# ------------------------------------------------------------------------------------------------ targets


def hv_targets(instances: np.ndarray) -> np.ndarray:
    """HoVer-Net training targets: ``instances (H, W)`` integer map → ``hv (2, H, W) float32`` in [-1, 1].

    Channel 0: horizontal (column) offset of each nuclear pixel from its nucleus' centre of mass, channel 1:
    vertical (row) offset; negative and positive offsets are divided separately by their largest magnitude within
    the nucleus (hover_net ``gen_instance_hv_map``); 0 outside nuclei. Unlike hover_net the centre of mass is not
    rounded and the grid is not shifted by one pixel, so a symmetric nucleus gets an antisymmetric map.
    """
    inst = _check_instances(instances)
    h, w = inst.shape
    out = np.zeros((2, h * w), dtype=np.float32)
    idx, lab, _, n = _pixels(inst)
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
