"""Seeded synthetic H&E tiles with exact ground truth, for unit tests and offline sample data.

A tile is drawn from its label maps, so image and truth agree by construction:

1. optional **glands**: ellipses (random size and orientation) with a white lumen, a ring of epithelial
   cytoplasm and a ring of epithelial nuclei elongated towards the lumen;
2. **nuclei** in the stroma: ellipses of ``nucleus_diameter_um`` (major axis) with random orientation and
   aspect; a ``cluster_fraction`` of them grows in clusters whose members touch (share a border) yet stay
   separate instances — a later member never overwrites an earlier one, and each keeps one connected piece
   of at least ``min_kept_fraction`` of its ellipse; free nuclei keep a gap of at least one pixel;
3. **stain rendering** by Beer–Lambert: a haematoxylin and an eosin concentration map (eosin with a smooth
   fibrous texture, haematoxylin with chromatin texture per nucleus) are blurred slightly and turned into
   RGB = 255·10^(−(c_H·OD_H + c_E·OD_E)), plus Gaussian pixel noise.

:func:`synthetic_tile` returns a :class:`~.task.Sample` (task ``"synthetic"``) with ``image (H, W, 3) uint8``,
``semantic (H, W) uint8`` (0 background, 1 nucleus, 2 gland when ``glands=True``: lumen + epithelium outside
nuclei) and ``instances (H, W) uint32`` (nuclei 1..N: epithelial ones first, then clustered, then free).
:func:`synthetic_points_tile` adds the nuclei's centroids as points. Same seed and arguments → identical
arrays. All sizes are in µm and converted with ``mpp``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from .task import Sample

TEXTURE_TRUNCATE = 3.0  # Gaussian kernels of the textures are cut at this many sigmas (speed; invisible)


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything tunable about a synthetic tile (sizes in µm, concentrations in stain units)."""

    nuclei_per_mm2: float = 3000.0  # stromal nuclei density when n_nuclei is not given
    nucleus_diameter_um: tuple[float, float] = (3.0, 8.0)  # major-axis diameter range
    nucleus_aspect: tuple[float, float] = (0.6, 1.0)  # minor/major axis ratio range
    cluster_size: tuple[int, int] = (2, 5)  # members per cluster (inclusive range)
    cluster_overlap: float = 0.2  # a new member's centre is pushed this fraction of the radii into its neighbour
    min_kept_fraction: float = 0.6  # a clustered nucleus keeps at least this share of its ellipse
    placement_tries: int = 30  # random placements tried per nucleus / gland before giving up on it
    glands_per_mm2: float = 40.0  # gland density (at least one gland when glands=True)
    gland_radius_um: tuple[float, float] = (25.0, 45.0)  # semi-major axis range
    gland_aspect: tuple[float, float] = (0.65, 1.0)
    gland_gap_um: float = 2.0  # minimum stroma between two glands
    lumen_fraction: float = 0.45  # lumen semi-axes / gland semi-axes
    epithelial_nucleus_um: tuple[float, float] = (7.0, 3.5)  # (along the radius, along the ring) diameters
    epithelial_gap_um: float = 1.0  # spacing between neighbouring epithelial nuclei
    od_haematoxylin: tuple[float, float, float] = (0.55, 0.65, 0.25)  # RGB optical density per unit c_H
    od_eosin: tuple[float, float, float] = (0.05, 0.20, 0.09)  # RGB optical density per unit c_E
    stroma_eosin: float = 1.0  # c_E of stroma (modulated by the texture)
    stroma_texture: float = 0.35  # relative amplitude of the stromal eosin texture
    texture_um: tuple[float, float] = (1.5, 5.0)  # texture smoothing (across, along the fibres)
    nucleus_haematoxylin: tuple[float, float] = (0.8, 1.3)  # per-nucleus c_H range
    chromatin_texture: float = 0.25  # relative amplitude of the chromatin texture
    nucleus_eosin: float = 0.4
    epithelium_eosin: float = 0.85
    epithelium_haematoxylin: float = 0.12
    lumen_eosin: float = 0.05
    background_haematoxylin: float = 0.05  # faint haematoxylin everywhere
    blur_px: float = 0.7  # Gaussian blur of the concentration maps (optics)
    noise_grey: float = 3.0  # standard deviation of the pixel noise (grey levels)


@dataclass
class _Canvas:
    """Label maps being drawn: nuclei instances, gland and lumen masks, nuclei that belong to glands."""

    inst: np.ndarray
    gland: np.ndarray
    lumen: np.ndarray
    chromatin: list  # per instance: c_H factor
    n_epithelial: int = 0

    @property
    def n(self) -> int:
        return len(self.chromatin)


def _ellipses(centre: tuple[float, float], semi: tuple[float, float], theta: float, shape: tuple[int, int],
              grow: float = 1.0) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
    """An ellipse inside ``shape`` and the same grown by ``grow`` px: ``(slices, footprint, grown footprint)``.

    ``semi`` = (a along ``theta``, b across); angles are directions ``(cos, sin)`` in (row, col). Both
    footprints are boolean arrays over ``slices`` (the grown ellipse's bounding box cut to ``shape``).
    """
    a, b = semi
    cy, cx = centre
    r = int(np.ceil(max(a, b) + grow)) + 1
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, shape[0])
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u2, v2 = (dy * c + dx * s) ** 2, (dx * c - dy * s) ** 2
    fp = u2 / np.float32(a * a) + v2 / np.float32(b * b) <= 1.0
    big = u2 / np.float32((a + grow) ** 2) + v2 / np.float32((b + grow) ** 2) <= 1.0
    return (slice(y0, y1), slice(x0, x1)), fp, big


def _random_nucleus(rng: np.random.Generator, cfg: SyntheticConfig, px_per_um: float) -> tuple:
    d = rng.uniform(*cfg.nucleus_diameter_um) * px_per_um
    semi = (d / 2, d / 2 * rng.uniform(*cfg.nucleus_aspect))
    return semi, rng.uniform(0, np.pi)


def _try_free(cv: _Canvas, centre, semi, theta, free_of_glands: bool = True) -> tuple | None:
    """``(slices, footprint)`` of a nucleus at ``centre`` if it and a one-pixel margin are free, else None."""
    e = _ellipses(centre, semi, theta, cv.inst.shape)
    if e is None or not e[1].any():
        return None
    sl, fp, big = e
    if cv.inst[sl][big].any() or (free_of_glands and cv.gland[sl][big].any()):
        return None
    return sl, fp


def _add(cv: _Canvas, fp, rng: np.random.Generator, cfg: SyntheticConfig, keep: np.ndarray | None = None) -> None:
    sl, m = fp
    cv.inst[sl][m if keep is None else keep] = cv.n + 1
    cv.chromatin.append(rng.uniform(*cfg.nucleus_haematoxylin))


def _radius_along(semi, theta: float, phi: float) -> float:
    a, b = semi
    t = phi - theta
    return a * b / np.hypot(b * np.cos(t), a * np.sin(t))


def _try_member(cv: _Canvas, prev: int, prev_geom, members: list[int], semi, theta, rng,
                cfg: SyntheticConfig) -> tuple[float, float] | None:
    """Place a cluster member touching nucleus ``prev`` (``prev_geom`` = centre, semi, theta); its centre or None."""
    pc, psemi, ptheta = prev_geom
    phi = rng.uniform(0, 2 * np.pi)  # direction (cos, sin) in (row, col), the convention of _ellipse
    dist = (_radius_along(psemi, ptheta, phi) + _radius_along(semi, theta, phi)) * (1 - cfg.cluster_overlap)
    centre = (pc[0] + dist * np.cos(phi), pc[1] + dist * np.sin(phi))
    e = _ellipses(centre, semi, theta, cv.inst.shape)
    if e is None:
        return None
    sl, m, big = e
    near = cv.inst[sl][big]
    if np.setdiff1d(near[near > 0], members).size or cv.gland[sl][big].any():
        return None  # would touch a nucleus outside the cluster, or a gland
    own = cv.inst[sl]
    keep = m & (own == 0)
    if not (m & (own == prev)).any() or keep.sum() < cfg.min_kept_fraction * m.sum():
        return None
    if ndi.label(keep)[1] != 1:
        return None
    _add(cv, (sl, m), rng, cfg, keep)
    return centre


def _place_cluster(cv: _Canvas, size: int, rng, cfg: SyntheticConfig, px_per_um: float) -> int:
    """Place up to ``size`` touching nuclei; returns how many were placed."""
    h, w = cv.inst.shape
    for _ in range(cfg.placement_tries):
        semi, theta = _random_nucleus(rng, cfg, px_per_um)
        centre = (rng.uniform(0, h), rng.uniform(0, w))
        fp = _try_free(cv, centre, semi, theta)
        if fp is not None:
            break
    else:
        return 0
    _add(cv, fp, rng, cfg)
    members, geoms = [cv.n], [(centre, semi, theta)]
    while len(members) < size:
        for _ in range(cfg.placement_tries):
            k = int(rng.integers(len(members)))
            semi, theta = _random_nucleus(rng, cfg, px_per_um)
            centre = _try_member(cv, members[k], geoms[k], members, semi, theta, rng, cfg)
            if centre is not None:
                members.append(cv.n)
                geoms.append((centre, semi, theta))
                break
        else:
            break
    return len(members)


def _place_free(cv: _Canvas, rng, cfg: SyntheticConfig, px_per_um: float) -> bool:
    h, w = cv.inst.shape
    for _ in range(cfg.placement_tries):
        semi, theta = _random_nucleus(rng, cfg, px_per_um)
        fp = _try_free(cv, (rng.uniform(0, h), rng.uniform(0, w)), semi, theta)
        if fp is not None:
            _add(cv, fp, rng, cfg)
            return True
    return False


def _place_gland(cv: _Canvas, rng, cfg: SyntheticConfig, px_per_um: float) -> bool:
    """Draw one gland (outer ellipse, lumen, ring of epithelial nuclei) where no gland is yet."""
    h, w = cv.inst.shape
    for _ in range(cfg.placement_tries):
        a = rng.uniform(*cfg.gland_radius_um) * px_per_um
        semi, theta = (a, a * rng.uniform(*cfg.gland_aspect)), rng.uniform(0, np.pi)
        centre = (rng.uniform(0.3 * a, h - 0.3 * a), rng.uniform(0.3 * a, w - 0.3 * a))
        e = _ellipses(centre, semi, theta, (h, w), grow=cfg.gland_gap_um * px_per_um)
        if e is not None and not cv.gland[e[0]][e[2]].any() and not cv.inst[e[0]][e[2]].any():
            break
    else:
        return False
    sl, m, _ = e
    cv.gland[sl] |= m
    lumen = _ellipses(centre, (semi[0] * cfg.lumen_fraction, semi[1] * cfg.lumen_fraction), theta, (h, w))
    if lumen is not None:
        cv.lumen[lumen[0]] |= lumen[1]
    _epithelial_ring(cv, centre, semi, theta, rng, cfg, px_per_um)
    return True


def _epithelial_ring(cv: _Canvas, centre, semi, theta, rng, cfg: SyntheticConfig, px_per_um: float) -> None:
    """Nuclei along the middle of the epithelium, long axis pointing to the lumen."""
    mid = (1 + cfg.lumen_fraction) / 2
    ring = (1 - cfg.lumen_fraction) * min(semi)  # epithelium thickness (px) on the short axis
    along = min(cfg.epithelial_nucleus_um[0] * px_per_um / 2, 0.4 * ring)
    across = cfg.epithelial_nucleus_um[1] * px_per_um / 2
    step = 2 * across + cfg.epithelial_gap_um * px_per_um + 1
    perimeter = np.pi * mid * (semi[0] + semi[1])
    n = max(int(perimeter // step), 3)
    c, s = np.cos(theta), np.sin(theta)
    for t in np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi / n):
        u, v = mid * semi[0] * np.cos(t), mid * semi[1] * np.sin(t)
        p = (centre[0] + u * c - v * s, centre[1] + u * s + v * c)
        normal = np.arctan2(semi[0] * np.sin(t), semi[1] * np.cos(t)) + theta  # outward normal angle
        fp = _try_free(cv, p, (along, across), normal, free_of_glands=False)
        if fp is not None:
            _add(cv, fp, rng, cfg)
            cv.n_epithelial += 1


def _texture(rng, shape, sigma_px: tuple[float, float]) -> np.ndarray:
    """Zero-mean, unit-std smooth noise; anisotropic (along rows or columns) when the sigmas differ."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    sigma = sigma_px if rng.random() < 0.5 else sigma_px[::-1]  # fibres run along rows or along columns
    t = ndi.gaussian_filter(noise, sigma=sigma, truncate=TEXTURE_TRUNCATE)
    return (t - t.mean()) / (t.std() + 1e-6)


def _render(cv: _Canvas, rng, cfg: SyntheticConfig, px_per_um: float) -> np.ndarray:
    shape = cv.inst.shape
    sig = (cfg.texture_um[0] * px_per_um, cfg.texture_um[1] * px_per_um)
    c_e = cfg.stroma_eosin * np.clip(1 + cfg.stroma_texture * _texture(rng, shape, sig), 0.15, None)
    c_h = np.full(shape, cfg.background_haematoxylin, np.float32)
    epi = cv.gland & ~cv.lumen
    c_e[epi], c_h[epi] = cfg.epithelium_eosin, cfg.epithelium_haematoxylin
    c_e[cv.lumen] = cfg.lumen_eosin
    nuc = cv.inst > 0
    if nuc.any():
        per = np.r_[0.0, np.asarray(cv.chromatin, np.float32)]
        fine = _texture(rng, shape, (0.6 * px_per_um, 0.6 * px_per_um))
        c_h[nuc] = per[cv.inst[nuc]] * np.clip(1 + cfg.chromatin_texture * fine[nuc], 0.3, None)
        c_e[nuc] = cfg.nucleus_eosin
    c_h, c_e = ndi.gaussian_filter(c_h, cfg.blur_px), ndi.gaussian_filter(c_e, cfg.blur_px)
    return _beer_lambert(c_h, c_e, rng, cfg)


def _beer_lambert(c_h: np.ndarray, c_e: np.ndarray, rng, cfg: SyntheticConfig) -> np.ndarray:
    """RGB = 255 * 10^-(c_H OD_H + c_E OD_E) + noise, channel by channel in float32 (in place, for speed)."""
    out = np.empty((*c_h.shape, 3), np.uint8)
    minus_ln10 = np.float32(-np.log(10.0))
    for ch in range(3):
        v = c_h * np.float32(cfg.od_haematoxylin[ch] * minus_ln10)
        v += c_e * np.float32(cfg.od_eosin[ch] * minus_ln10)
        np.exp(v, out=v)
        v *= np.float32(255.0)
        v += np.float32(cfg.noise_grey) * rng.standard_normal(v.shape, dtype=np.float32)
        np.clip(v, 0.0, 255.0, out=v)
        out[..., ch] = np.rint(v)
    return out


def _draw(shape, rng, cfg: SyntheticConfig, px_per_um: float, n_nuclei: int, cluster_fraction: float,
          glands: bool) -> _Canvas:
    cv = _Canvas(np.zeros(shape, np.uint32), np.zeros(shape, bool), np.zeros(shape, bool), [])
    area_mm2 = shape[0] * shape[1] / px_per_um**2 * 1e-6
    if glands:
        for _ in range(max(1, int(round(cfg.glands_per_mm2 * area_mm2)))):
            _place_gland(cv, rng, cfg, px_per_um)
    target = int(round(n_nuclei * cluster_fraction))
    placed = 0
    while placed < target:
        size = min(int(rng.integers(cfg.cluster_size[0], cfg.cluster_size[1] + 1)), target - placed)
        got = _place_cluster(cv, max(size, 1), rng, cfg, px_per_um)
        if got == 0:
            break
        placed += got
    for _ in range(n_nuclei - placed):
        if not _place_free(cv, rng, cfg, px_per_um):
            break
    return cv


def synthetic_tile(
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    n_nuclei: int | None = None,
    cluster_fraction: float = 0.3,
    glands: bool = False,
    mpp: float = 0.5,
    config: SyntheticConfig | None = None,
) -> Sample:
    """A synthetic H&E tile with exact nucleus (and gland) ground truth.

    Args:
        shape: ``(H, W)`` in pixels.
        seed: random seed; equal seeds and arguments give identical tiles.
        n_nuclei: stromal nuclei to place (default: ``config.nuclei_per_mm2`` × tile area); fewer are placed
            when the tile is full (``meta["n_nuclei"]`` has the real count, epithelial nuclei included).
        cluster_fraction: share of the stromal nuclei placed in touching clusters (0..1).
        glands: add glands; the classes become ``(background, nucleus, gland)``.
        mpp: µm per pixel (sizes in ``config`` are in µm).

    Returns:
        A :class:`Sample` of task ``"synthetic"`` (image, semantic, instances; parameters and seed in ``meta``).
    """
    cfg = config or SyntheticConfig()
    h, w = int(shape[0]), int(shape[1])
    if h < 8 or w < 8:
        raise ValueError(f"synthetic tile must be at least 8x8 pixels, got {h}x{w}")
    if not 0 <= cluster_fraction <= 1:
        raise ValueError(f"cluster_fraction must be in [0, 1], got {cluster_fraction}")
    if not mpp > 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    px_per_um = 1.0 / mpp
    if n_nuclei is None:
        n_nuclei = int(round(cfg.nuclei_per_mm2 * h * w * mpp**2 * 1e-6))
    if n_nuclei < 0:
        raise ValueError(f"n_nuclei must be >= 0, got {n_nuclei}")
    rng = np.random.default_rng(seed)
    cv = _draw((h, w), rng, cfg, px_per_um, n_nuclei, cluster_fraction, glands)
    image = _render(cv, rng, cfg, px_per_um)
    semantic = np.zeros((h, w), np.uint8)
    if glands:
        semantic[cv.gland] = 2
    semantic[cv.inst > 0] = 1
    names = ("background", "nucleus", "gland") if glands else ("background", "nucleus")
    meta = {"seed": seed, "n_nuclei": cv.n, "n_epithelial": cv.n_epithelial, "glands": glands,
            "cluster_fraction": cluster_fraction, "config": asdict(cfg)}
    return Sample(image=image, task="synthetic", sample_id=f"synthetic_{seed}", class_names=names,
                  semantic=semantic, instances=cv.inst, mpp=mpp, meta=meta)


def instance_centroids(instances: np.ndarray, n: int) -> np.ndarray:
    """``(n, 2)`` float64 (row, col) centroids of instances ``1..n`` (NaN for an empty id)."""
    ys, xs = np.nonzero(instances)
    lab = instances[ys, xs].astype(np.int64)
    count = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(lab, ys, minlength=n + 1)[1:] / count
        cx = np.bincount(lab, xs, minlength=n + 1)[1:] / count
    return np.stack([cy, cx], axis=1).reshape(-1, 2)


def synthetic_points_tile(shape: tuple[int, int] = (256, 256), *, seed: int = 0, **kwargs) -> Sample:
    """:func:`synthetic_tile` plus each nucleus's centroid as a point (point ``i`` ↔ instance ``i + 1``).

    Without glands the classes are ``(background, nucleus)``; with ``glands=True`` they are
    ``(background, stromal_nucleus, epithelial_nucleus)`` and ``semantic`` / ``point_classes`` use them.
    ``semantic`` and ``instances`` stay the exact masks (for evaluation); rasterise the points with
    :func:`.points.points_to_masks` for point-supervised training. Keyword arguments go to
    :func:`synthetic_tile`.
    """
    tile = synthetic_tile(shape, seed=seed, **kwargs)
    n, n_epi = tile.meta["n_nuclei"], tile.meta["n_epithelial"]
    points = instance_centroids(tile.instances, n)
    if tile.meta["glands"]:
        classes = np.where(np.arange(1, n + 1) <= n_epi, 2, 1).astype(np.int64)
        names = ("background", "stromal_nucleus", "epithelial_nucleus")
        semantic = np.r_[0, classes].astype(np.uint8)[tile.instances]
    else:
        classes, names, semantic = np.ones(n, np.int64), tile.class_names, tile.semantic
    return tile.with_(points=points, point_classes=classes, class_names=names, semantic=semantic,
                      sample_id=f"synthetic_points_{seed}", meta={**tile.meta, "kind": "points"})
