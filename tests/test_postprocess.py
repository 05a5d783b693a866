"""HoVer-Net post-processing: one small test per step on hand-made arrays, the composition, table and targets."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import find_contours
from skimage.segmentation import watershed as sk_watershed

from napari_metahistoseg.config import HoVerPostConfig
from napari_metahistoseg.postprocess import (
    HoVerPostProcessor,
    binary_open_disk,
    hv_edge_map,
    hv_targets,
    instance_table,
    markers,
    sobel_kernels,
    sobel_size_px,
    watershed,
    watershed_mask,
    watershed_surface,
)

MPP = 0.25
CFG = HoVerPostConfig()
MONUSEG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "monuseg" / "instance_masks"


def discs(shape, centres, radius):
    """Instance map with disc i+1 at centres[i] (later discs overwrite earlier ones)."""
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.uint32)
    for i, (r, c) in enumerate(centres, start=1):
        out[(rr - r) ** 2 + (cc - c) ** 2 <= radius**2] = i
    return out


def maps(inst):
    return (inst > 0).astype(np.float32), hv_targets(inst)


def best_iou(truth, pred, i):
    t = truth == i
    ids, counts = np.unique(pred[t], return_counts=True)
    j = ids[np.argmax(counts)]
    return (t & (pred == j)).sum() / (t | (pred == j)).sum()


# ------------------------------------------------------------------------------------------------ composition


def test_two_touching_discs_are_separated():
    truth = discs((64, 80), [(32, 26), (32, 51)], 14)  # overlapping discs: the second cuts the first
    inst, table = HoVerPostProcessor(CFG)(*maps(truth), MPP)
    assert inst.dtype == np.uint32 and inst.shape == truth.shape
    assert inst.max() == 2 and set(np.unique(inst)) == {0, 1, 2}
    assert best_iou(truth, inst, 1) > 0.9 and best_iou(truth, inst, 2) > 0.9
    assert list(table["id"]) == [1, 2]


def test_one_disc_and_empty():
    truth = discs((48, 48), [(24, 24)], 12)
    inst, _ = HoVerPostProcessor(CFG)(*maps(truth), MPP)
    assert inst.max() == 1 and best_iou(truth, inst, 1) > 0.9
    empty = np.zeros((32, 40), np.uint32)
    inst, table = HoVerPostProcessor(CFG)(*maps(empty), MPP, nc_prob=np.full((3, 32, 40), 1 / 3, np.float32))
    assert inst.max() == 0
    assert table["bbox"].shape == (0, 4) and table["contour"] == [] and table["type"].shape == (0,)
    assert all(len(table[k]) == 0 for k in ("id", "area_px", "centroid_row", "centroid_col", "type_prob"))


def test_processor_equals_the_public_steps_and_skimage():
    rng = np.random.default_rng(0)
    truth = discs((96, 96), rng.integers(8, 88, size=(14, 2)), 7)
    np_prob, hv = maps(truth)
    np_prob = np.clip(ndi.gaussian_filter(np_prob, 1) + rng.normal(0, 0.1, np_prob.shape), 0, 1).astype(np.float32)
    hv = (hv + rng.normal(0, 0.05, hv.shape)).astype(np.float32)
    for cfg in (CFG, replace(CFG, fill_mask_holes=False), replace(CFG, threads=1)):
        mask = watershed_mask(np_prob, cfg, MPP)
        edge = hv_edge_map(hv, cfg, MPP)
        mk = markers(mask, edge, cfg, MPP)
        surface = watershed_surface(mask, edge, cfg, MPP)
        steps = watershed(mask, mk, surface)
        assert np.array_equal(steps, sk_watershed(surface, mk, mask=mask))  # markers are 1..M, so ids agree
        assert np.array_equal(HoVerPostProcessor(cfg).instances(np_prob, hv, MPP), steps)
        assert steps.max() >= 10


@pytest.mark.skipif(not MONUSEG.is_dir(), reason="shared MoNuSeg dev data not present")
def test_real_tile_quality():
    import imageio.v3 as iio

    from napari_metahistoseg.metrics import aji

    truth = iio.imread(sorted(MONUSEG.glob("*.png"))[0])[:400, :400].astype(np.uint32)
    inst = HoVerPostProcessor(CFG).instances(*maps(truth), MPP)
    assert aji(truth, inst) > 0.9


def test_threads_must_be_a_positive_integer():
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads"):
            HoVerPostConfig(threads=bad)


def test_min_size_is_physical():
    cfg = replace(CFG, min_object_area_um2=20.0, min_marker_area_um2=0.0)
    for mpp in (0.25, 0.5):  # the same 3 µm-radius (28 µm²) nucleus drawn at two resolutions
        r = 3.0 / mpp
        truth = discs((int(8 * r), int(8 * r)), [(4 * r, 4 * r)], r)
        assert HoVerPostProcessor(cfg).instances(*maps(truth), mpp).max() == 1
        assert HoVerPostProcessor(replace(cfg, min_object_area_um2=40.0)).instances(*maps(truth), mpp).max() == 0
    truth = discs((40, 40), [(20, 20)], 4)  # 49 px: 3.1 µm² at 0.25 µm/px, 12.3 µm² at 0.5 µm/px
    mask = (truth > 0).astype(np.float32)
    assert not watershed_mask(mask, replace(CFG, min_object_area_um2=5.0), 0.25).any()
    assert watershed_mask(mask, replace(CFG, min_object_area_um2=5.0), 0.5).sum() == 49


def test_bad_inputs_raise():
    pp = HoVerPostProcessor(CFG)
    good_np, good_hv = np.zeros((8, 8), np.float32), np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        pp(np.zeros((1, 8, 8), np.float32), good_hv, MPP)
    with pytest.raises(ValueError, match="hv"):
        pp(good_np, np.zeros((3, 8, 8), np.float32), MPP)
    with pytest.raises(ValueError, match="hv"):
        pp(good_np, np.zeros((2, 8, 9), np.float32), MPP)
    with pytest.raises(ValueError, match="nc_prob"):
        pp(good_np, good_hv, MPP, nc_prob=np.zeros((3, 9, 8), np.float32))
    with pytest.raises(ValueError, match="mpp"):
        pp(good_np, good_hv, 0.0)
    with pytest.raises(ValueError, match="within"):
        pp(np.full((8, 8), 1.5, np.float32), good_hv, MPP)
    with pytest.raises(ValueError, match="finite"):
        pp(good_np, np.full((2, 8, 8), np.nan, np.float32), MPP)
    with pytest.raises(ValueError, match="float"):
        pp(np.zeros((8, 8), np.uint8), good_hv, MPP)
    with pytest.raises(ValueError, match="marker_map"):
        watershed(np.ones((4, 4), bool), np.zeros((4, 4)), np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="edge"):
        markers(np.ones((4, 4), bool), np.zeros((4, 5), np.float32), CFG, MPP)
    with pytest.raises(ValueError, match="instances"):
        hv_targets(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="np_threshold"):
        HoVerPostConfig(np_threshold=1.5)


# ------------------------------------------------------------------------------------------------ steps


def test_watershed_mask_fills_holes_and_drops_small_objects():
    prob = np.zeros((20, 20), np.float32)
    prob[2:12, 2:12] = 1.0
    prob[5:8, 5:8] = 0.0  # a hole
    prob[15, 15] = 0.9  # a 1-pixel object
    mask = watershed_mask(prob, replace(CFG, min_object_area_um2=2 * MPP**2), MPP)
    assert mask[2:12, 2:12].all() and not mask[15, 15] and mask.sum() == 100
    kept = watershed_mask(prob, replace(CFG, min_object_area_um2=0.0, fill_mask_holes=False), MPP)
    assert not kept[5:8, 5:8].any() and kept[15, 15]
    assert watershed_mask(prob, replace(CFG, np_threshold=0.95), MPP)[15, 15] == 0


def test_sobel_kernels_match_opencv():
    smooth, deriv = sobel_kernels(5)
    np.testing.assert_allclose(smooth * 16, [1, 4, 6, 4, 1])
    np.testing.assert_allclose(deriv * 6, [-1, -2, 0, 2, 1])
    smooth, deriv = sobel_kernels(3)
    np.testing.assert_allclose(deriv * 2, [-1, 0, 1])
    assert sobel_size_px(5.25, 0.25) == 21 and sobel_size_px(5.25, 0.5) == 11 and sobel_size_px(5.25, 5.0) == 3
    with pytest.raises(ValueError):
        sobel_kernels(4)


def test_hv_edge_map_is_the_normalised_sobel():
    rng = np.random.default_rng(1)
    hv = rng.normal(size=(2, 30, 41)).astype(np.float32)
    smooth, deriv = sobel_kernels(sobel_size_px(CFG.sobel_kernel_um, MPP))
    gx = ndi.correlate1d(ndi.correlate1d(hv[0].astype(float), smooth, axis=0, mode="mirror"), deriv, axis=1,
                         mode="mirror")
    gy = ndi.correlate1d(ndi.correlate1d(hv[1].astype(float), smooth, axis=1, mode="mirror"), deriv, axis=0,
                         mode="mirror")
    norm = [(g - g.min()) / (g.max() - g.min()) for g in (gx, gy)]
    edge = hv_edge_map(hv, CFG, MPP)
    assert edge.dtype == np.float32 and edge.shape == (30, 41)
    np.testing.assert_allclose(edge, np.maximum(1 - norm[0], 1 - norm[1]), atol=1e-5)
    assert hv_edge_map(np.zeros((2, 5, 5), np.float32), CFG, MPP).max() == 1.0  # constant maps: no gradient


def test_markers_fill_holes_open_and_drop_small():
    mask = np.zeros((30, 30), bool)
    mask[2:28, 2:28] = True
    edge = np.ones((30, 30), np.float32)
    ring = discs((30, 30), [(15, 15)], 9) > 0
    edge[ring & ~(discs((30, 30), [(15, 15)], 6) > 0)] = 0.0  # a ring-shaped seed ...
    edge[15, 15] = 0.0  # ... with an island in its hole; filling the hole joins them
    edge[3, 3] = 0.0  # a lone pixel removed by the opening
    for no_holes in (False, True):
        mk = markers(mask, edge, CFG, MPP, mask_has_no_holes=no_holes)
        assert mk.dtype == np.int32 and mk.max() == 1 and mk[15, 15] == 1 and mk[3, 3] == 0
    assert markers(mask, edge, replace(CFG, min_marker_area_um2=1000.0), MPP).max() == 0


def test_binary_open_disk_matches_scipy():
    rng = np.random.default_rng(2)
    m = ndi.gaussian_filter(rng.random((60, 70)), 2) > 0.5
    for r in (1, 2, 2.5, 3.7):
        k = int(r)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        fp = yy**2 + xx**2 <= r * r
        expected = ndi.binary_dilation(ndi.binary_erosion(m, fp, border_value=1), fp)
        assert np.array_equal(binary_open_disk(m, r), expected)
    assert binary_open_disk(m, 0.5) is m


def test_watershed_drops_unmarked_components_and_renumbers():
    mask = np.zeros((10, 20), bool)
    mask[2:8, 1:9] = mask[2:8, 11:19] = True
    mk = np.zeros((10, 20), np.int32)
    mk[4, 2], mk[4, 7] = 7, 3  # two markers in the left object; none in the right one
    surface = np.tile(np.abs(np.arange(20) - 4.5).astype(np.float32), (10, 1))
    out = watershed(mask, mk, surface)
    assert out.dtype == np.uint32 and set(np.unique(out)) == {0, 1, 2}
    assert out[4, 7] == 1 and out[4, 2] == 2 and not out[:, 10:].any()  # ids in marker-id order (3 → 1, 7 → 2)


# ------------------------------------------------------------------------------------------------ table


def test_table_columns_are_consistent():
    rng = np.random.default_rng(3)
    inst = discs((80, 90), rng.integers(5, 75, size=(9, 2)), 6)
    inst[0, :5] = 50  # a non-contiguous id touching the border
    table = instance_table(inst)
    ids = np.unique(inst)[1:]
    assert list(table["id"]) == list(ids) and len(table["contour"]) == ids.size
    assert table["area_px"].sum() == (inst > 0).sum()
    b = table["bbox"]
    assert ((b[:, 0] <= table["centroid_row"]) & (table["centroid_row"] < b[:, 2])).all()
    assert ((b[:, 1] <= table["centroid_col"]) & (table["centroid_col"] < b[:, 3])).all()
    for i, box, contour in zip(ids, b, table["contour"], strict=True):
        rr, cc = np.nonzero(inst == i)
        assert (box == [rr.min(), cc.min(), rr.max() + 1, cc.max() + 1]).all()
        assert np.array_equal(contour[0], contour[-1])  # closed
        assert (contour.min(0) >= box[:2] - 0.5).all() and (contour.max(0) <= box[2:] - 0.5).all()
        # the same vertices as skimage's marching squares on the nucleus crop
        crop = np.pad(inst[box[0]:box[2], box[1]:box[3]] == i, 1).astype(np.uint8)
        expected = max(find_contours(crop, 0.5), key=len) + box[:2] - 1
        assert {tuple(p) for p in np.round(expected * 2)} == {tuple(p) for p in np.round(contour * 2)}


def test_contours_of_hard_shapes():
    inst = np.zeros((9, 9), np.int32)
    inst[1, 1] = inst[2, 2] = 1  # diagonal pixels: two 4-connected pieces; the larger (first) is kept
    inst[4:8, 4:8] = 2
    inst[5:7, 5:7] = 0  # a hole: the outer loop is kept
    c1, c2 = instance_table(inst)["contour"]
    assert len(c1) == 5 and len(c2) == 17


def test_types_from_nc_prob():
    inst = discs((40, 60), [(20, 15), (20, 45)], 8)
    nc = np.zeros((3, 40, 60), np.float32)
    nc[0] = 1.0
    nc[:, inst == 1] = np.array([0.2, 0.7, 0.1])[:, None]
    nc[:, inst == 2] = np.array([0.3, 0.1, 0.6])[:, None]
    nc[:, (inst == 2) & (np.arange(60) > 50)] = np.array([0.9, 0.05, 0.05])[:, None]  # background-typed pixels
    table = instance_table(inst, nc)
    assert list(table["type"]) == [1, 2]
    assert table["type_prob"][0] == pytest.approx(0.7)
    part = (inst == 2) & (np.arange(60) > 50)
    assert table["type_prob"][1] == pytest.approx((0.6 * ((inst == 2).sum() - part.sum()) + 0.05 * part.sum())
                                                  / (inst == 2).sum())
    _, table = HoVerPostProcessor(CFG)(*maps(inst), MPP, nc_prob=nc)
    assert list(table["type"]) == [1, 2]


# ------------------------------------------------------------------------------------------------ targets


def test_hv_targets_of_a_disc_are_antisymmetric():
    inst = discs((31, 31), [(15, 15)], 9)
    hv = hv_targets(inst)
    assert hv.shape == (2, 31, 31) and hv.dtype == np.float32
    assert hv.min() == -1.0 and hv.max() == 1.0 and not hv[:, inst == 0].any()
    np.testing.assert_allclose(hv[0], -hv[0][:, ::-1], atol=1e-6)
    np.testing.assert_allclose(hv[1], -hv[1][::-1, :], atol=1e-6)
    np.testing.assert_allclose(hv[0], hv[1].T, atol=1e-6)
    assert (np.diff(hv[0][15, 6:25]) > 0).all()  # increases left to right inside the nucleus


def slow_hv(inst):
    out = np.zeros((2,) + inst.shape, np.float32)
    rr, cc = np.mgrid[: inst.shape[0], : inst.shape[1]]
    for i in np.unique(inst)[1:]:
        m = inst == i
        for ch, coord in ((0, cc), (1, rr)):
            d = (coord - coord[m].mean())[m]
            d = np.where(d < 0, d / max(-d.min(), 1e-12), d / max(d.max(), 1e-12))
            out[ch][m] = d
    return out


def test_hv_targets_match_a_per_nucleus_loop():
    rng = np.random.default_rng(4)
    inst = discs((50, 60), rng.integers(0, 60, size=(12, 2)), 5)
    inst[inst == 3] = 1000  # ids need not be contiguous
    inst[10, 10:13] = 77  # a 1-pixel-high nucleus: no vertical extent on one side
    np.testing.assert_allclose(hv_targets(inst), slow_hv(inst), atol=1e-5)
    assert not hv_targets(np.zeros((5, 5), np.uint16)).any()


def test_hv_targets_are_fast():
    rng = np.random.default_rng(5)
    inst = discs((1000, 1000), [], 0)
    rr, cc = np.mgrid[:15, :15]
    disc = (rr - 7) ** 2 + (cc - 7) ** 2 <= 49
    for i, (r, c) in enumerate(rng.integers(0, 985, size=(400, 2)), start=1):
        inst[r:r + 15, c:c + 15][disc] = i
    best = min(_timed(hv_targets, inst) for _ in range(3))
    assert best < 0.3


def _timed(fn, *args):
    start = time.process_time()  # CPU time: robust to other jobs on a shared machine
    fn(*args)
    return time.process_time() - start


def test_binary_open_disk_sparse_and_dense_paths_agree(monkeypatch):
    import napari_metahistoseg.postprocess as pp

    rng = np.random.default_rng(5)
    m = ndi.gaussian_filter(rng.random((80, 90)), 2.5) > 0.56  # sparse blobs, some on the border
    m[0, :5] = m[:4, -1] = True
    for r in (1, 2, 3.2):
        monkeypatch.setattr(pp, "_SPARSE_OPEN_RATIO", 1e9)
        sparse = binary_open_disk(m, r)
        monkeypatch.setattr(pp, "_SPARSE_OPEN_RATIO", 0.0)
        dense = binary_open_disk(m, r)
        k = int(r)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        fp = yy**2 + xx**2 <= r * r
        assert np.array_equal(sparse, dense)
        assert np.array_equal(sparse, ndi.binary_dilation(ndi.binary_erosion(m, fp, border_value=1), fp))
        assert sparse.any() and sparse.flags.c_contiguous


def test_two_thread_split_equals_one_thread_on_many_nuclei():
    rng = np.random.default_rng(7)
    centres = rng.integers(6, 314, size=(160, 2))
    truth = discs((320, 320), centres, 6)  # overlapping discs, many of them crossing the middle row
    np_prob, hv = maps(truth)
    np_prob = np.clip(ndi.gaussian_filter(np_prob, 1) + rng.normal(0, 0.1, np_prob.shape), 0, 1).astype(np.float32)
    hv = np.clip(hv + rng.normal(0, 0.05, hv.shape), -1, 1).astype(np.float32)
    cfg = replace(CFG, marker_threshold=0.4, min_marker_area_um2=0.6)  # discs of 7 µm²: small markers
    one = HoVerPostProcessor(replace(cfg, threads=1)).instances(np_prob, hv, MPP)
    two = HoVerPostProcessor(replace(cfg, threads=2)).instances(np_prob, hv, MPP)
    assert one.max() > 100 and np.array_equal(one, two)
    rows_of = [np.flatnonzero((two == i).any(1)) for i in range(1, two.max() + 1)]
    assert any(r[0] < 160 <= r[-1] for r in rows_of)  # some nuclei straddle the split


def test_table_with_a_contour_thread_equals_one_thread():
    rng = np.random.default_rng(3)
    inst = discs((120, 140), rng.integers(5, 115, size=(25, 2)), 6)
    nc = rng.random((4, 120, 140)).astype(np.float32)
    nc /= nc.sum(0)
    one = instance_table(inst, nc, threads=1)
    two = instance_table(inst, nc, threads=2)
    assert list(one) == list(two) and len(one["id"]) > 15
    for k in one:
        if k == "contour":
            assert all(np.array_equal(a, b) for a, b in zip(one[k], two[k], strict=True))
        else:
            assert np.array_equal(one[k], two[k]), k
    empty = instance_table(np.zeros((8, 8), np.uint32), threads=2)
    assert empty["contour"] == [] and empty["bbox"].shape == (0, 4)


# ------------------------------------------------------------------------------------------ large objects


def _dumbbell(neck_px: int) -> np.ndarray:
    """Two discs of radius 40 px joined by a horizontal neck ``neck_px`` wide (a gland pair touching)."""
    yy, xx = np.mgrid[:120, :240]
    m = ((yy - 60) ** 2 + (xx - 60) ** 2 <= 40**2) | ((yy - 60) ** 2 + (xx - 180) ** 2 <= 40**2)
    m[60 - neck_px // 2:60 + (neck_px + 1) // 2, 60:180] = True
    return m


def test_object_instances_split_necks_fill_lumens_drop_crumbs():
    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.postprocess import object_instances

    cfg = ObjectPostConfig()
    mask = _dumbbell(6)
    ring = (np.hypot(*np.mgrid[-30:31, -30:31]) <= 30) & (np.hypot(*np.mgrid[-30:31, -30:31]) > 12)
    big = np.zeros((200, 400), bool)
    big[:120, :240] = mask
    big[130:191, 300:361] = ring  # a gland with its lumen
    big[10:16, 300:306] = True  # a 36 px crumb = 9 µm² at 0.5 µm/px
    inst = object_instances(big, cfg, 0.5)
    assert inst.dtype == np.uint32 and inst.shape == big.shape
    assert len(np.unique(inst)) - 1 == 3  # two halves of the dumbbell + the ring; the crumb is gone
    assert len(np.unique(inst[60, [40, 200]])) == 2  # the two discs are different objects
    lumen = inst[160, 330]
    assert lumen > 0 and np.all(inst[130:191, 300:361][ring] == lumen)  # lumen filled, same object as the ring
    assert not inst[10:16, 300:306].any()
    # components only (depth 0): the dumbbell stays one object; no fill: the lumen stays empty
    flat = object_instances(big, ObjectPostConfig(split_depth_um=0), 0.5)
    assert len(np.unique(flat)) - 1 == 2 and flat[60, 40] == flat[60, 200]
    assert object_instances(big, ObjectPostConfig(fill_holes=False), 0.5)[160, 330] == 0
    # sizes are in µm: at 4 µm/px the same crumb is 576 µm² and is kept as an object of its own
    coarse = object_instances(big, cfg, 4.0)
    assert coarse[10:16, 300:306].all() and len(np.unique(coarse[10:16, 300:306])) == 1


def test_object_instances_never_drop_a_thin_object():
    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.postprocess import object_instances

    strip = np.zeros((60, 300), bool)
    strip[25:35, 10:290] = True  # 5 µm wide, 140 µm long (700 µm²): no distance maximum 12 µm deep
    inst = object_instances(strip, ObjectPostConfig(), 0.5)
    assert set(np.unique(inst)) == {0, 1} and np.array_equal(inst > 0, strip)
    assert not object_instances(np.zeros((5, 7), bool), ObjectPostConfig(), 0.5).any()
    with pytest.raises(ValueError, match="split_depth_um"):
        ObjectPostConfig(split_depth_um=-1)
    with pytest.raises(ValueError, match="mpp"):
        object_instances(strip, ObjectPostConfig(), 0.0)


def test_object_instances_on_a_coarse_grid_match_full_resolution():
    """``work_mpp_um``: the rules run on a coarse grid and labels are painted back; same objects, the fine mask's
    pixels (not blocks), the lumen still filled."""
    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.postprocess import object_factor, object_instances

    big = np.zeros((203, 401), bool)  # sizes not multiples of the factor
    big[:120, :240] = _dumbbell(6)
    ring = (np.hypot(*np.mgrid[-30:31, -30:31]) <= 30) & (np.hypot(*np.mgrid[-30:31, -30:31]) > 12)
    big[130:191, 300:361] = ring
    fine = object_instances(big, ObjectPostConfig(), 0.5)
    cfg = ObjectPostConfig(work_mpp_um=1.5)
    assert object_factor(cfg, 0.5) == 3 and object_factor(ObjectPostConfig(), 0.5) == 1
    assert object_factor(cfg, 2.0) == 1  # never finer than the image
    coarse = object_instances(big, cfg, 0.5)
    assert coarse.shape == big.shape and coarse.dtype == np.uint32
    assert len(np.unique(coarse)) - 1 == len(np.unique(fine)) - 1 == 3
    assert len(np.unique(coarse[60, [40, 200]])) == 2 and coarse[160, 330] > 0  # split kept, lumen filled
    # the lumen is filled with the ring's label; every other labelled pixel is a mask pixel; every mask pixel of a
    # kept object is labelled
    inner, lumen = np.zeros_like(big), np.zeros_like(big)
    inner[130:191, 300:361] = np.hypot(*np.mgrid[-30:31, -30:31]) <= 10
    lumen[130:191, 300:361] = np.hypot(*np.mgrid[-30:31, -30:31]) <= 12
    assert np.all(coarse[inner] == coarse[160, 330])
    assert not ((coarse > 0) & ~big & ~lumen).any()
    assert np.all(coarse[big] > 0)
    # the objects agree pixel for pixel up to the coarse grid at their borders
    from napari_metahistoseg.metrics import aji
    assert aji(fine, coarse) > 0.97


def test_downsample_mask_majority_and_edges():
    from napari_metahistoseg.postprocess import downsample_mask

    m = np.zeros((5, 7), bool)
    m[:2, :2] = True  # a full 2x2 block
    m[2, 2] = True  # 1 of 4: not set
    m[4, 6] = True  # the 1x1 corner block: set
    d = downsample_mask(m, 2)
    assert d.shape == (3, 4)
    assert d[0, 0] and not d[1, 1] and d[2, 3] and d.sum() == 2
    assert np.array_equal(downsample_mask(m, 1), m)


def test_coarse_objects_paint_in_strips_equals_whole():
    """Painting a slide strip by strip (what predict_large does) gives the whole-image labels."""
    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.postprocess import CoarseObjects, downsample_mask

    rng = np.random.default_rng(0)
    mask = np.zeros((250, 330), bool)
    for _ in range(12):
        r, c, rad = rng.integers(20, 230), rng.integers(20, 310), rng.integers(8, 25)
        mask |= np.hypot(*np.ogrid[-r:250 - r, -c:330 - c]) <= rad
    objs = CoarseObjects(downsample_mask(mask, 4), ObjectPostConfig(), 2.0, 4)
    whole = objs.paint(mask)
    strips = np.concatenate([objs.paint(mask[r:r + 64], r, 0) for r in range(0, 250, 64)])
    assert np.array_equal(whole, strips) and whole.max() == objs.n > 0


def test_object_table_columns():
    from napari_metahistoseg.postprocess import ObjectStats, object_table

    obj = np.zeros((20, 30), np.uint32)
    obj[2:6, 3:9] = 1
    obj[10:20, 20:30] = 3
    sem = np.zeros((20, 30), np.uint8)
    sem[2:6, 3:9] = 2
    sem[10:20, 20:25] = 1
    sem[10:20, 25:30] = 2
    sem[10:14, 20:30] = 1  # object 3: 60 px class 1, 40 px class 2 -> class 1
    t = object_table(obj, sem, 3)
    assert t["id"].tolist() == [1, 3] and t["class"].tolist() == [2, 1]
    assert t["area_px"].tolist() == [24, 100]
    assert t["bbox"].tolist() == [[2, 3, 6, 9], [10, 20, 20, 30]]
    np.testing.assert_allclose(t["centroid_row"], [3.5, 14.5])
    np.testing.assert_allclose(t["centroid_col"], [5.5, 24.5])
    # accumulated over two strips: the same table
    s = ObjectStats(3, 3)
    s.add(obj[:12], sem[:12])
    s.add(obj[12:], sem[12:], 12, 0)
    t2 = s.table()
    assert all(np.array_equal(np.asarray(t[k]), np.asarray(t2[k])) for k in t)
    with pytest.raises(ValueError, match="label 3"):
        ObjectStats(2, 3).add(obj, sem)


def test_object_markers_on_a_coarser_grid():
    """``marker_mpp_um``: the h-maxima markers are searched on a sub-sampled grid, the watershed at full resolution:
    the same objects, boundaries at full resolution."""
    from napari_metahistoseg.config import ObjectPostConfig
    from napari_metahistoseg.metrics import aji
    from napari_metahistoseg.postprocess import object_instances

    rng = np.random.default_rng(1)
    mask = np.zeros((300, 360), bool)
    for _ in range(14):
        r, c, rad = rng.integers(30, 270), rng.integers(30, 330), rng.integers(18, 40)
        mask |= np.hypot(*np.ogrid[-r:300 - r, -c:360 - c]) <= rad
    mask[:120, :240] |= _dumbbell(6)
    full = object_instances(mask, ObjectPostConfig(), 0.5)
    sub = object_instances(mask, ObjectPostConfig(marker_mpp_um=2.0), 0.5)
    assert len(np.unique(sub)) == len(np.unique(full)) and np.array_equal(sub > 0, full > 0)
    assert aji(full, sub) > 0.98
    with pytest.raises(ValueError, match="marker_mpp_um"):
        ObjectPostConfig(marker_mpp_um=-1)


def test_probabilities_a_rounding_error_outside_0_1_are_clipped_not_refused():
    inst = discs((64, 64), [(32, 24), (32, 40)], 9)
    np_prob, hv = maps(inst)
    np_prob = np_prob.astype(np.float32)
    pp = HoVerPostProcessor(CFG)
    ref, _ = pp(np_prob, hv, MPP)
    # what a sum of softmax outputs or a resampled map gives: 1 + 1 ulp-ish, and a tiny negative
    off = np_prob.copy()
    off[np_prob >= 1] = np.float32(1.0000001)
    off[np_prob <= 0] = np.float32(-1e-7)
    assert off.max() > 1 and off.min() < 0
    got, _ = pp(off, hv, MPP)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="within"):  # a real excursion is still an error
        pp(np.where(np_prob >= 1, np.float32(1.01), np_prob), hv, MPP)
