"""Consolidation of several annotators: label votes, label maps (majority, STAPLE) and point clicks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_metahistoseg.data import IGNORE, open_dataset
from napari_metahistoseg.data.consolidate import majority_vote_maps, staple_maps, vote_labels, vote_points

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"

# ------------------------------------------------------------------------------------------ vote_labels

VOTES = np.array([[0, 0, 1], [1, 1, 0], [0, 1, -1], [-1, -1, -1], [2, 1, -1], [2, 2, 2]])


def test_vote_labels_majority_and_agreement():
    labels, agreement = vote_labels(VOTES, n_classes=3, tie="first")
    assert labels.tolist() == [0, 1, 0, -1, 2, 2]
    np.testing.assert_allclose(agreement, [2 / 3, 2 / 3, 0.5, 0.0, 0.5, 1.0])


@pytest.mark.parametrize(("tie", "expected"), [("first", [0, 2]), ("lowest", [0, 1]), ("ignore", [-1, -1])])
def test_vote_labels_tie_rules(tie, expected):
    labels, _ = vote_labels(VOTES, n_classes=3, tie=tie)
    assert labels[[2, 4]].tolist() == expected  # the two 1-1 ties: (0 vs 1, first voter 0), (2 vs 1, first 2)


def test_vote_labels_errors():
    with pytest.raises(ValueError, match="n_classes"):
        vote_labels(np.array([[3]]), n_classes=3)
    with pytest.raises(ValueError, match="tie"):
        vote_labels(VOTES, n_classes=3, tie="random")
    with pytest.raises(ValueError, match="shape"):
        vote_labels(np.array([0, 1]), n_classes=2)


# ------------------------------------------------------------------------------------------ label maps


def test_majority_vote_maps_abstain_and_ties():
    a = np.array([[0, 1, 2, IGNORE]], np.uint8)
    b = np.array([[0, 2, 2, IGNORE]], np.uint8)
    c = np.array([[1, IGNORE, 0, IGNORE]], np.uint8)
    out = majority_vote_maps([a, b, c], 3, tie="first")
    # pixel 0: 0,0,1 -> 0; pixel 1: 1 vs 2 (c abstains) -> first voter's 1; pixel 2: 2; pixel 3: nobody -> IGNORE
    assert out.tolist() == [[0, 1, 2, IGNORE]]
    assert majority_vote_maps([a, b, c], 3, tie="lowest").tolist() == [[0, 1, 2, IGNORE]]
    assert majority_vote_maps([b, a, c], 3, tie="first").tolist() == [[0, 2, 2, IGNORE]]
    assert majority_vote_maps([a, b, c], 3, tie="ignore").tolist() == [[0, IGNORE, 2, IGNORE]]
    assert out.dtype == np.uint8


def test_majority_vote_maps_errors():
    with pytest.raises(ValueError, match="no label maps"):
        majority_vote_maps([], 2)
    with pytest.raises(ValueError, match="annotator 1"):
        majority_vote_maps([np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8)], 2)


STRIPES = np.array([[0, 0, 1, 1, 2, 2]] * 4, np.uint8)


def test_staple_unanimous_and_clear_majority():
    assert np.array_equal(staple_maps([STRIPES, STRIPES, STRIPES], 3), STRIPES)
    odd = STRIPES.copy()
    odd[0, 1], odd[3, 4] = 1, 0
    for undecided in ("first", "ignore"):
        out = staple_maps([STRIPES, odd, STRIPES], 3, undecided=undecided)
        assert out.dtype == np.uint8 and np.array_equal(out, STRIPES)


def test_staple_undecided_pixels():
    # two annotators who disagree everywhere, symmetrically: STAPLE cannot decide any pixel
    a = np.array([[0, 1], [1, 0]], np.uint8)
    b = 1 - a
    assert (staple_maps([a, b], 2, undecided="ignore") == IGNORE).all()
    assert np.array_equal(staple_maps([a, b], 2, undecided="first"), a)  # the authors' rule: first annotator
    assert np.array_equal(staple_maps([b, a], 2, undecided="first"), b)


def test_staple_single_map_and_errors():
    out = staple_maps([STRIPES], 3)
    assert np.array_equal(out, STRIPES) and out is not STRIPES
    with pytest.raises(ValueError, match="outside 0..1"):
        staple_maps([STRIPES, STRIPES], 2)
    with pytest.raises(ValueError, match="annotator 1"):
        staple_maps([STRIPES, STRIPES[:, :5]], 3)
    with pytest.raises(ValueError, match="undecided"):
        staple_maps([STRIPES], 3, undecided="vote")
    with pytest.raises(ValueError, match="no label maps"):
        staple_maps([], 3)
    with pytest.raises(ValueError, match="integers"):
        staple_maps([STRIPES.astype(float)], 3)


# ------------------------------------------------------------------------------------------ points


def test_vote_points_hand_checked():
    a = np.array([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0]])
    b = np.array([[1.0, 0.0], [50.0, 52.0]])
    c = np.array([[0.0, 1.0], [30.0, 30.0], [11.0, 10.0]])
    pts, votes = vote_points([a, b, c], radius_px=3.0, min_votes=2, return_votes=True)
    # clusters: {a0,b0,c0} mean (1/3, 1/3); {a1,c2} mean (10.5, 10); {a2,b1} mean (50, 51); c1 alone
    np.testing.assert_allclose(pts, [[1 / 3, 1 / 3], [10.5, 10.0], [50.0, 51.0]])
    assert votes.tolist() == [3, 2, 2]
    np.testing.assert_allclose(vote_points([a, b, c], 3.0, 3), [[1 / 3, 1 / 3]])
    assert len(vote_points([a, b, c], 3.0, 1)) == 4


def test_vote_points_one_vote_per_annotator_and_radius_inclusive():
    a = np.array([[0.0, 0.0], [0.0, 1.0]])  # two clicks of one annotator, 1 px apart: never merged
    b = np.array([[0.0, 0.5]])
    pts, votes = vote_points([a, b], radius_px=2.0, min_votes=1, return_votes=True)
    assert votes.tolist() == [2, 1]
    np.testing.assert_allclose(pts[0], [0.0, 0.25])
    far = np.array([[0.0, 2.0]])  # exactly at the radius: matched
    assert vote_points([np.zeros((1, 2)), far], 2.0, 2).shape == (1, 2)
    assert vote_points([np.zeros((1, 2)), far + [0, 1e-6]], 2.0, 2).shape == (0, 2)


def test_vote_points_optimal_matching():
    # greedy nearest-first would pair b0 with a1 and leave a0 alone; the assignment pairs both
    a = np.array([[0.0, 0.0], [0.0, 2.0]])
    b = np.array([[0.0, 1.5], [0.0, 3.5]])
    pts, votes = vote_points([a, b], radius_px=1.6, min_votes=2, return_votes=True)
    assert votes.tolist() == [2, 2]
    np.testing.assert_allclose(pts, [[0.0, 0.75], [0.0, 2.75]])


def test_vote_points_empty_and_errors():
    assert vote_points([np.zeros((0, 2)), np.zeros((0, 2))], 5.0, 1).shape == (0, 2)
    assert vote_points([np.zeros((0, 2)), np.array([[1.0, 2.0]])], 5.0, 1).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="min_votes"):
        vote_points([np.zeros((1, 2))], 5.0, 2)
    with pytest.raises(ValueError, match="radius"):
        vote_points([np.zeros((1, 2))], 0.0, 1)
    with pytest.raises(ValueError, match="annotator 1"):
        vote_points([np.zeros((1, 2)), np.array([[np.nan, 0.0]])], 5.0, 1)
    with pytest.raises(ValueError, match="no point sets"):
        vote_points([], 5.0, 1)


# ------------------------------------------------------------------------------------------ AMi-Br


@pytest.mark.skipif(not (SHARED_DATA / "amibr_mitosis").is_dir(), reason="../shared/data/amibr_mitosis missing")
def test_amibr_three_votes():
    ds = open_dataset(SHARED_DATA / "amibr_mitosis")
    assert ds.layout == "amibr_mitosis" and len(ds) == 513
    samples = list(ds)
    unanimous = sum(s.meta["agreement"] == 1.0 for s in samples)
    assert unanimous == 416
    for s in samples:
        assert len(s.meta["votes"]) == 3
        folder = "atypical" if s.patch_label == 1 else "normal"
        assert s.sample_id in {p.stem for p in (SHARED_DATA / "amibr_mitosis" / "patches" / folder).glob("*.png")}
        assert s.patch_label == int(sum(s.meta["votes"]) >= 2)
