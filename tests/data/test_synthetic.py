"""Synthetic H&E tiles: exact, consistent ground truth; determinism; speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_metahistoseg.data.synthetic import (
    SyntheticConfig,
    instance_centroids,
    synthetic_points_tile,
    synthetic_tile,
)


def _touching_pairs(inst: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((inst[:, :-1], inst[:, 1:]), (inst[:-1], inst[1:])):
        m = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[m].tolist(), b[m].tolist(), strict=True)}
    return pairs


@pytest.mark.parametrize("glands", [False, True])
def test_tile_ground_truth_is_exact(glands):
    s = synthetic_tile((128, 160), seed=3, glands=glands, cluster_fraction=0.5)
    assert s.task == "synthetic" and s.image.shape == (128, 160, 3) and s.image.dtype == np.uint8
    assert s.instances.dtype == np.uint32 and s.semantic.dtype == np.uint8
    n = s.meta["n_nuclei"]
    assert n > 10 and set(np.unique(s.instances)) == set(range(n + 1))  # ids 1..n, none empty
    assert np.array_equal(s.semantic == 1, s.instances > 0)  # nucleus class exactly on the instances
    for i, sl in enumerate(ndi.find_objects(s.instances), start=1):
        assert ndi.label(s.instances[sl] == i)[1] == 1  # every nucleus is one connected piece
    if glands:
        assert s.class_names == ("background", "nucleus", "gland") and (s.semantic == 2).any()
        assert s.meta["n_epithelial"] > 0
    else:
        assert s.class_names == ("background", "nucleus") and s.semantic.max() == 1


def test_clusters_touch_but_stay_separate():
    touching = synthetic_tile((256, 256), seed=1, cluster_fraction=1.0)
    assert len(_touching_pairs(touching.instances)) >= 10
    apart = synthetic_tile((256, 256), seed=1, cluster_fraction=0.0)
    assert not _touching_pairs(apart.instances)  # free nuclei keep a gap
    assert ndi.label(apart.instances > 0)[1] == apart.meta["n_nuclei"]  # so connected components = nuclei


def test_nucleus_sizes_follow_mpp():
    cfg = SyntheticConfig()
    for mpp in (0.25, 0.5):
        s = synthetic_tile((256, 256), seed=0, mpp=mpp, cluster_fraction=0.0)
        areas = np.bincount(s.instances.ravel())[1:]
        d_um = 2 * np.sqrt(np.median(areas) / np.pi) * mpp  # equivalent diameter
        lo, hi = cfg.nucleus_diameter_um
        assert lo * cfg.nucleus_aspect[0] <= d_um <= hi, (mpp, d_um)
        assert s.mpp == mpp


def test_colours_are_he_like():
    s = synthetic_tile((256, 256), seed=2, glands=True)
    img = s.image.astype(float)
    nuc, stroma = img[s.instances > 0].mean(0), img[s.semantic == 0].mean(0)
    assert nuc[2] > nuc[0] > nuc[1] and nuc.mean() < 130  # dark purple-blue haematoxylin
    assert stroma[0] > stroma[2] > stroma[1] and stroma.mean() > 150  # pink eosin
    lumen_like = img[(s.semantic == 2)].mean(0)
    assert lumen_like.mean() > stroma.mean()  # white lumen brightens the gland area


def test_deterministic_for_a_seed():
    a, b = synthetic_tile((96, 96), seed=7, glands=True), synthetic_tile((96, 96), seed=7, glands=True)
    for field in ("image", "semantic", "instances"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    c = synthetic_tile((96, 96), seed=8, glands=True)
    assert not np.array_equal(a.image, c.image)
    assert a.meta["seed"] == 7


def test_n_nuclei_and_errors():
    s = synthetic_tile((128, 128), seed=0, n_nuclei=5, cluster_fraction=0.0)
    assert s.meta["n_nuclei"] == 5
    empty = synthetic_tile((64, 64), seed=0, n_nuclei=0)
    assert not empty.instances.any() and not empty.semantic.any()
    for kwargs in ({"cluster_fraction": 1.5}, {"mpp": 0.0}, {"n_nuclei": -1}):
        with pytest.raises(ValueError):
            synthetic_tile((64, 64), **kwargs)
    with pytest.raises(ValueError, match="at least 8x8"):
        synthetic_tile((4, 64))


def test_points_tile():
    p = synthetic_points_tile((128, 128), seed=4)
    n = p.meta["n_nuclei"]
    assert p.points.shape == (n, 2) and p.point_classes.tolist() == [1] * n
    np.testing.assert_allclose(p.points, instance_centroids(p.instances, n))
    ys, xs = np.nonzero(p.instances == 1)
    np.testing.assert_allclose(p.points[0], [ys.mean(), xs.mean()])
    assert p.meta["kind"] == "points"
    g = synthetic_points_tile((128, 128), seed=4, glands=True)
    n_epi = g.meta["n_epithelial"]
    assert g.class_names == ("background", "stromal_nucleus", "epithelial_nucleus")
    assert g.point_classes[:n_epi].tolist() == [2] * n_epi and set(g.point_classes[n_epi:].tolist()) <= {1}
    assert np.array_equal(g.semantic, np.r_[0, g.point_classes][g.instances])


def test_fast_enough():
    synthetic_tile((512, 512), seed=0, glands=True)  # warm-up (imports, allocator)
    best = min(_timed(lambda: synthetic_tile((512, 512), seed=1, glands=True)) for _ in range(3))
    assert best < 0.2, f"512x512 tile took {best:.3f} s"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
