"""Pure helpers of the Qt package: layer conversion, progress text, error text, annotation reading."""

from __future__ import annotations

import numpy as np
import pytest

from napari_metahistoseg._qt.importing import merge_support, read_annotations
from napari_metahistoseg._qt.layers import layer_to_support, table_features
from napari_metahistoseg._qt.workers import describe, error_text
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.sample_data import support_to_layer


def test_support_round_trip():
    values = np.array([[0, 1], [2, 3]], np.uint8)
    sup = layer_to_support(values)
    np.testing.assert_array_equal(sup, [[IGNORE, 0], [1, 2]])
    np.testing.assert_array_equal(support_to_layer(sup), values)
    with pytest.raises(ValueError, match="too large"):
        layer_to_support(np.array([[300]]))


def test_table_features():
    table = {"id": np.array([3, 5], np.uint32), "centroid_row": np.array([1.0, 2.0]),
             "centroid_col": np.array([3.0, 4.0]), "area_px": np.array([10, 20]),
             "bbox": np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), "contour": [np.zeros((3, 2))] * 2}
    f = table_features(table)
    assert list(f["index"]) == [3, 5] and list(f["bbox_max_col"]) == [3, 7] and "contour" not in f
    assert table_features({"id": np.zeros(0)}) == {}
    f = table_features({**table, "type": np.array([0, 2]), "type_prob": np.array([0.5, 0.9])}, ["bg", "a", "b"])
    assert list(f["type_name"]) == ["bg", "b"] and list(f["type_prob"]) == [0.5, 0.9]


def test_describe_progress():
    assert describe({"stage": "adapt", "step": 3, "steps": 10, "loss": 0.5, "eta_s": 7}) == (
        3, 10, "adapting 3/10 · loss 0.5000 · ETA 7 s")
    assert describe({"stage": "predict", "done": 2, "total": 4})[:2] == (2, 4)
    assert describe({"stage": "backbone"}) == (0, 0, "loading backbone")


def test_error_text():
    assert error_text("Adapt", ValueError("x.png: corrupt")) == "Adapt failed: x.png: corrupt"
    assert error_text("Adapt", RuntimeError("boom")) == "Adapt failed: RuntimeError: boom"


def test_read_annotations_and_merge(tmp_path):
    (tmp_path / "p.csv").write_text("x,y\n3,4\n")
    got = read_annotations(tmp_path / "p.csv", (10, 10), 2)
    np.testing.assert_array_equal(got.points, [[4, 3]])
    assert got.summary() == "1 points"
    sup = np.full((2, 2), IGNORE, np.uint8)
    sup[0, 0] = 1
    np.testing.assert_array_equal(merge_support(np.array([[0, 1], [1, 0]], np.uint8), sup), [[2, 1], [1, 0]])
    with pytest.raises(ValueError, match="do not match"):
        merge_support(np.zeros((3, 3), np.uint8), sup)
