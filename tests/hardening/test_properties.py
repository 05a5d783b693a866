"""Property-based tests (hypothesis): image conversion, tiling and stitching, circle rasterisation, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_metahistoseg.config import TilingConfig
from napari_metahistoseg.data.io import to_rgb_uint8
from napari_metahistoseg.data.points import points_to_masks
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.metrics import (
    ConfusionAccumulator,
    aji,
    classification_scores,
    detection_scores,
    panoptic_quality,
)
from napari_metahistoseg.tiling import blend_window, predict_tiled, tile_grid

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------------ image conversion

SUPPORTED_DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64, np.float16,
                    np.float32, np.float64, np.bool_]


def _expected_hw(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(H, W) of a supported shape by the documented rule, None when the shape is unsupported."""
    if len(shape) == 2:
        h, w = shape
    elif len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        h, w = shape[:2]
    elif len(shape) == 3 and shape[0] in (1, 3, 4):
        h, w = shape[1:]
    else:
        return None
    return (h, w) if h > 0 and w > 0 else None


supported_shapes = st.one_of(
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 4)),
    st.tuples(st.sampled_from([1, 3, 4]), st.integers(1, 6), st.integers(5, 8)),
)


@FAST
@given(data=st.data(), dtype=st.sampled_from(SUPPORTED_DTYPES), shape=supported_shapes)
def test_supported_arrays_become_rgb_uint8(data, dtype, shape) -> None:
    elements = {"allow_nan": False, "allow_infinity": False} if np.issubdtype(dtype, np.floating) else None
    arr = data.draw(hnp.arrays(dtype, shape, elements=elements))
    out = to_rgb_uint8(arr)
    assert out.dtype == np.uint8 and out.shape == (*_expected_hw(shape), 3) and out.flags.c_contiguous


@FAST
@given(arr=hnp.arrays(st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64, np.complex64, np.bool_]),
                      hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)))
def test_any_array_converts_or_raises_value_error(arr) -> None:
    """Any shape, any values (NaN/inf included), complex: a valid image or ValueError, never another exception."""
    hw = _expected_hw(arr.shape)
    bad_values = np.issubdtype(arr.dtype, np.complexfloating) or (
        np.issubdtype(arr.dtype, np.floating) and arr.size and not np.isfinite(arr).all())
    if hw is None or bad_values:
        with pytest.raises(ValueError):
            to_rgb_uint8(arr, source="x")
    else:
        assert to_rgb_uint8(arr).shape == (*hw, 3)


@FAST
@given(rgb=hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))))
def test_conversion_rules_are_consistent(rgb) -> None:
    assert np.array_equal(to_rgb_uint8(rgb), rgb)  # RGB uint8 unchanged
    opaque = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1)
    assert np.array_equal(to_rgb_uint8(opaque), rgb)  # opaque RGBA = RGB
    assert (to_rgb_uint8(np.concatenate([rgb, np.zeros_like(rgb[..., :1])], -1)) == 255).all()  # transparent=white
    assert np.array_equal(to_rgb_uint8(np.moveaxis(rgb, -1, 0)), rgb) or rgb.shape[1] in (1, 2, 3, 4)
    assert np.array_equal(to_rgb_uint8(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1))  # grey replicated
    wide = rgb.astype(np.uint16) * 257  # 16-bit of the same image: scaled back exactly
    assert np.array_equal(to_rgb_uint8(wide), rgb) or wide.max() <= 255
    assert np.array_equal(to_rgb_uint8(rgb / 255.0), rgb)  # floats in [0, 1]


# ------------------------------------------------------------------------------------------------ tiling


@st.composite
def grids(draw, max_side: int = 150, min_tile: int = 2, max_halo_fraction: float = 0.5):
    tile = draw(st.integers(min_tile, 48))
    halo = draw(st.integers(0, min((tile - 1) // 2, int(tile * max_halo_fraction))))
    return draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), tile, halo


@FAST
@given(g=grids(), multiple=st.sampled_from([1, 2, 8]))
def test_tile_grid_covers_every_pixel_with_positive_weight(g, multiple) -> None:
    h, w, tile, halo = g
    tiles = tile_grid((h, w), tile, halo, multiple)
    cover = np.zeros((h, w), np.int32)
    wsum = np.zeros((h, w), np.float64)
    for r0, c0, r1, c1 in tiles:
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w
        assert r1 - r0 <= tile and c1 - c0 <= tile
        win = blend_window(r1 - r0, c1 - c0, halo, (r0 == 0, r1 == h, c0 == 0, c1 == w))
        assert win.shape == (r1 - r0, c1 - c0) and (win > 0).all() and (win <= 1).all()
        cover[r0:r1, c0:c1] += 1
        wsum[r0:r1, c0:c1] += win
    assert (cover > 0).all() and (wsum > 0).all()
    assert len(set(tiles)) == len(tiles)
    for axis, n in ((0, h), (1, w)):  # per axis: one tile size; neighbours overlap by at least 2 * halo
        spans = sorted({(t[axis], t[axis + 2]) for t in tiles})
        assert len({b - a for a, b in spans}) == 1 and (n > tile or spans == [(0, n)])
        assert all(prev[1] - nxt[0] >= 2 * halo for prev, nxt in zip(spans, spans[1:], strict=False))


@settings(max_examples=30, deadline=None)
@given(g=grids(max_side=48, min_tile=8, max_halo_fraction=0.25), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_predict_tiled_identity_reproduces_input(g, batch, seed) -> None:
    h, w, tile, halo = g
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    gen = predict_tiled(lambda x: {"img": x}, image, cfg=TilingConfig(tile_px=tile, halo_px=halo, batch_size=batch),
                        devices=[torch.device("cpu")], channels={"img": 3})
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            out = stop.value["img"]
            break
    assert out.shape == (3, h, w) and out.dtype == np.float32
    assert np.array_equal(np.rint(np.moveaxis(out, 0, -1) * 255).astype(np.uint8), image)


# ------------------------------------------------------------------------------------------------ circles


@st.composite
def point_sets(draw):
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    n = draw(st.integers(0, 6))
    coord = st.tuples(st.floats(0, h, exclude_max=True), st.floats(0, w, exclude_max=True))
    pts = np.array(draw(st.lists(coord, min_size=n, max_size=n)), np.float64).reshape(-1, 2)
    cls = np.array(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)), np.int64)
    return pts, cls, (h, w), draw(st.floats(0, 8))


@FAST
@given(ps=point_sets(), background=st.sampled_from(["unknown", "background"]))
def test_circles_follow_the_nearest_point_rule(ps, background) -> None:
    pts, cls, (h, w), radius = ps
    sem, inst = points_to_masks(pts, cls, (h, w), radius, background=background)
    assert sem.shape == inst.shape == (h, w) and sem.dtype == np.uint8 and inst.dtype == np.uint32
    seeds = np.clip(np.rint(pts).astype(int), 0, [h - 1, w - 1])
    rr, cc = np.mgrid[:h, :w]
    d = np.hypot(rr[None] - seeds[:, 0, None, None], cc[None] - seeds[:, 1, None, None]) if len(pts) else None
    inside = (d <= radius).any(0) if len(pts) else np.zeros((h, w), bool)
    assert np.array_equal(inst > 0, inside)  # exactly the pixels within radius of some point
    if len(pts):
        owner = np.argmin(np.where(d <= radius, d, np.inf), axis=0) + 1  # nearest; ties → first listed
        assert np.array_equal(inst[inside], owner[inside])
        assert np.array_equal(sem[inside], cls[inst[inside] - 1])
        first = {tuple(s): k + 1 for k, s in reversed(list(enumerate(seeds.tolist())))}
        for (r, c), k in first.items():  # every point keeps its own centre pixel (the first of duplicates)
            assert inst[r, c] == k
    assert (sem[~inside] == (IGNORE if background == "unknown" else 0)).all()


@FAST
@given(ps=point_sets(), bad=st.sampled_from(["nan", "outside", "radius"]))
def test_bad_points_raise_value_error(ps, bad) -> None:
    pts, cls, (h, w), radius = ps
    pts = np.vstack([pts, [[0.0, 0.0]]])
    cls = np.append(cls, 1)
    if bad == "nan":
        pts[-1, 0] = np.nan
    elif bad == "outside":
        pts[-1] = [h + 0.5, 0.0]
    else:
        radius = -radius - 1.0
    with pytest.raises(ValueError):
        points_to_masks(pts, cls, (h, w), radius)


# ------------------------------------------------------------------------------------------------ metrics


@st.composite
def label_maps(draw, max_id: int = 4):
    shape = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    a = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, max_id)))
    b = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, max_id)))
    return a, b


@FAST
@given(maps=label_maps())
def test_instance_metric_ranges_symmetry_and_identity(maps) -> None:
    t, p = maps
    a = aji(t, p)
    pq = panoptic_quality(t, p)
    assert 0.0 <= a <= 1.0
    assert all(0.0 <= pq[k] <= 1.0 for k in ("pq", "dq", "sq"))
    swapped = panoptic_quality(p, t)
    assert pq["pq"] == pytest.approx(swapped["pq"]) and (pq["fp"], pq["fn"]) == (swapped["fn"], swapped["fp"])
    assert aji(t, t) == 1.0 and panoptic_quality(t, t)["pq"] == 1.0
    relabelled = np.where(p > 0, p + 100, 0)  # ids need not be contiguous
    assert aji(t, relabelled) == pytest.approx(a) and panoptic_quality(t, relabelled)["pq"] == pytest.approx(pq["pq"])


@FAST
@given(maps=label_maps(max_id=3), ignore=st.booleans())
def test_semantic_metric_ranges_and_perfect_prediction(maps, ignore) -> None:
    t, p = maps
    truth = t.astype(np.uint8)
    if ignore:
        truth[::2] = IGNORE
    acc = ConfusionAccumulator(4)
    acc.update(p, truth)
    for v in (acc.miou(), acc.dice_foreground(), acc.pixel_accuracy()):
        assert np.isnan(v) or 0.0 <= v <= 1.0
    assert np.all((acc.per_class_iou() >= 0) | np.isnan(acc.per_class_iou()))
    perfect = ConfusionAccumulator(4)
    perfect.update(np.where(truth == IGNORE, 0, truth), truth)
    if (truth != IGNORE).any():
        assert perfect.miou() == 1.0 and perfect.dice_foreground() == 1.0 and perfect.pixel_accuracy() == 1.0


points2d = hnp.arrays(np.float64, st.tuples(st.integers(0, 8), st.just(2)), elements=st.floats(0, 50))


@FAST
@given(a=points2d, b=points2d, radius=st.floats(0, 20))
def test_detection_scores_ranges_symmetry_and_identity(a, b, radius) -> None:
    s = detection_scores(a, b, radius)
    for k in ("precision", "recall", "f1"):
        assert 0.0 <= s[k] <= 1.0
    t = detection_scores(b, a, radius)
    assert s["f1"] == pytest.approx(t["f1"]) and s["precision"] == pytest.approx(t["recall"])
    assert s["tp"] + s["fp"] == len(a) and s["tp"] + s["fn"] == len(b)
    assert detection_scores(a, a, radius)["f1"] == 1.0


@FAST
@given(y=hnp.arrays(np.int64, st.integers(1, 30), elements=st.integers(0, 2)), data=st.data())
def test_classification_scores_ranges_and_perfect(y, data) -> None:
    p = data.draw(hnp.arrays(np.int64, y.shape, elements=st.integers(0, 2)))
    s = classification_scores(y, p, n_classes=3)
    for k in ("accuracy", "balanced_accuracy", "precision", "recall", "f1"):
        assert 0.0 <= s[k] <= 1.0
    perfect = classification_scores(y, y, n_classes=3)
    assert perfect["accuracy"] == perfect["balanced_accuracy"] == 1.0 and perfect["f1"] in (0.0, 1.0)
    assert perfect["f1"] == 1.0 or not (y == 1).any()
