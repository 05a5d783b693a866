"""Points → circles: radius, the nearest-point overlap rule, background modes, µm radii, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_metahistoseg.data import IGNORE
from napari_metahistoseg.data.points import mask_centroids, points_to_masks, radius_in_pixels


@pytest.mark.parametrize("radius", [1.0, 2.5, 4.0, 12.0])
def test_circle_is_the_disc_of_the_radius(radius):
    h = w = 41
    sem, inst = points_to_masks(np.array([[20.0, 20.0]]), None, (h, w), radius, background="background")
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= radius**2
    assert np.array_equal(inst == 1, disc) and np.array_equal(sem == 1, disc)
    assert sem.dtype == np.uint8 and inst.dtype == np.uint32


def test_subpixel_points_round_to_their_pixel():
    _, inst = points_to_masks(np.array([[3.4, 5.6]]), None, (10, 10), 1.0)
    assert inst[3, 6] == 1 and inst[2, 6] == 1 and inst[3, 4] == 0


def test_classes_and_instance_order():
    pts = np.array([[2.0, 2.0], [2.0, 12.0], [10.0, 7.0]])
    sem, inst = points_to_masks(pts, np.array([3, 1, 2]), (14, 16), 2.0)
    assert [inst[2, 2], inst[2, 12], inst[10, 7]] == [1, 2, 3]
    assert [sem[2, 2], sem[2, 12], sem[10, 7]] == [3, 1, 2]


def test_nearest_point_rule_splits_overlaps_on_the_bisector():
    pts = np.array([[5.0, 4.0], [5.0, 9.0]])  # 5 px apart, radius 4: circles overlap on columns 5..8
    _, inst = points_to_masks(pts, None, (11, 14), 4.0)
    assert inst[5, 4:7].tolist() == [1, 1, 1] and inst[5, 7:10].tolist() == [2, 2, 2]
    assert inst[5, 0] == 1 and inst[5, 13] == 2  # each keeps its far side


def test_ties_go_to_the_point_listed_first():
    a, b = [5.0, 5.0], [5.0, 9.0]  # column 7 is equidistant from both
    _, first_a = points_to_masks(np.array([a, b]), None, (11, 14), 3.0)
    _, first_b = points_to_masks(np.array([b, a]), None, (11, 14), 3.0)
    assert (first_a[:, 7][first_a[:, 7] > 0] == 1).all()  # a is point 1
    assert (first_b[:, 7][first_b[:, 7] > 0] == 1).all()  # b is point 1 now
    a, b = [4.0, 5.0], [8.0, 5.0]  # vertical neighbours: row 6 equidistant
    _, inst = points_to_masks(np.array([b, a]), None, (12, 10), 3.0)
    assert inst[6, 5] == 1  # b, listed first (scan order would give it to the upper point)


def test_duplicate_points_first_keeps_the_pixel():
    _, inst = points_to_masks(np.array([[3.0, 3.0], [3.0, 3.0]]), None, (8, 8), 2.0)
    assert set(np.unique(inst)) == {0, 1}


def test_background_modes():
    pts = np.array([[10.0, 10.0]])
    sem, _ = points_to_masks(pts, None, (21, 21), 3.0)  # default: an unclicked pixel is unknown
    assert sem[0, 0] == IGNORE and sem[10, 10] == 1
    sem, _ = points_to_masks(pts, None, (21, 21), 3.0, background="background")
    assert sem[0, 0] == 0 and sem[10, 13] == 1 and sem[10, 14] == 0
    sem, inst = points_to_masks(pts, None, (21, 21), 3.0, background="background", background_margin_px=2.0)
    assert sem[10, 13] == 1 and sem[10, 14] == IGNORE and sem[10, 15] == IGNORE and sem[10, 16] == 0
    assert inst[10, 14] == 0  # the ring is not part of the instance
    sem, _ = points_to_masks(pts, None, (21, 21), 3.0, background_margin_px=2.0)  # margin only with background
    assert sem[10, 16] == IGNORE and sem[0, 0] == IGNORE
    with pytest.raises(ValueError, match="background must be"):
        points_to_masks(pts, None, (21, 21), 3.0, background="zero")


def test_no_points():
    sem, inst = points_to_masks(np.zeros((0, 2)), None, (4, 5), 3.0, background="background")
    assert not sem.any() and not inst.any() and sem.shape == (4, 5)


def test_radius_in_pixels():
    assert radius_in_pixels(12, "px") == 12.0
    assert radius_in_pixels(6.0, "um", mpp=0.5) == 12.0
    assert radius_in_pixels(6.0, "µm", mpp=0.25) == 24.0
    with pytest.raises(ValueError, match="microns-per-pixel"):
        radius_in_pixels(6.0, "um", mpp=None)
    with pytest.raises(ValueError, match="unit"):
        radius_in_pixels(6.0, "mm", mpp=0.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            radius_in_pixels(bad, "px")


@pytest.mark.parametrize("pt", [[-0.1, 2.0], [2.0, 10.0], [10.0, 2.0], [np.nan, 1.0]])
def test_points_outside_or_nan_rejected(pt):
    with pytest.raises(ValueError, match="outside the image of 10x10|NaN"):
        points_to_masks(np.array([[1.0, 1.0], pt]), None, (10, 10), 2.0)


def test_mask_centroids():
    inst = np.zeros((6, 8), np.uint32)
    inst[1:3, 1:3] = 1
    inst[4, 5:8] = 2
    np.testing.assert_allclose(mask_centroids(inst), [[1.5, 1.5], [4.0, 6.0]])
    np.testing.assert_allclose(mask_centroids(inst > 0), [[1.5, 1.5], [4.0, 6.0]])
    np.testing.assert_allclose(mask_centroids(inst, min_area_px=4), [[1.5, 1.5]])


SHAPE = (24, 30)


def _far_apart(points: list[tuple[float, float]], min_dist: float) -> bool:
    p = np.asarray(points)
    d = np.hypot(*(p[:, None, :] - p[None, :, :]).transpose(2, 0, 1))
    return bool((d[np.triu_indices(len(p), 1)] >= min_dist).all())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, SHAPE[0] - 1), st.integers(0, SHAPE[1] - 1)), min_size=1, max_size=25,
             unique=True),
    st.floats(0.5, 8.0),
)
def test_each_grid_point_owns_its_pixel(points, radius):
    """Distinct pixel points (>= 1 px apart): every point's own pixel is in its own instance."""
    pts = np.asarray(points, np.float64)
    _, inst = points_to_masks(pts, None, SHAPE, radius)
    rc = pts.astype(int)
    assert inst[rc[:, 0], rc[:, 1]].tolist() == list(range(1, len(pts) + 1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, SHAPE[0] - 1), st.floats(0, SHAPE[1] - 1)), min_size=1, max_size=15)
    .filter(lambda p: _far_apart(p, 1.5)),
    st.floats(0.5, 8.0),
)
def test_each_subpixel_point_owns_its_pixel(points, radius):
    """Sub-pixel points at least 1.5 px apart (> sqrt 2, so they round to distinct pixels) own their pixel."""
    pts = np.asarray(points, np.float64)
    _, inst = points_to_masks(pts, None, SHAPE, radius)
    rc = np.rint(pts).astype(int)
    assert inst[rc[:, 0], rc[:, 1]].tolist() == list(range(1, len(pts) + 1))
