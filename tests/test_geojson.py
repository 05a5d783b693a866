"""Nuclei outlines as GeoJSON (:class:`napari_metahistoseg.inference.NucleiGeoJSON`): QuPath's layout, corner-based
pixel coordinates, closed rings, offsets of streamed windows, types."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk, polygon2mask

from napari_metahistoseg.inference import NucleiGeoJSON
from napari_metahistoseg.postprocess import instance_table


def _instances() -> np.ndarray:
    inst = np.zeros((60, 80), np.uint32)
    for i, (r, c, rad) in enumerate([(15, 15, 6), (30, 50, 9), (50, 20, 4), (10, 70, 3)], start=1):
        inst[disk((r, c), rad, shape=inst.shape)] = i
    inst[40:44, 60:75] = 5  # elongated, not convex-looking at the ends
    return inst


def _write(path, table) -> dict:
    w = NucleiGeoJSON(path, mpp=0.25)
    w.write(table)
    w.close()
    return json.loads(path.read_text())


def test_polygons_cover_their_nuclei(tmp_path):
    inst = _instances()
    table = instance_table(inst)
    doc = _write(tmp_path / "n.geojson", table)
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(table["id"]) == 5
    for f, nid, area in zip(doc["features"], table["id"], table["area_px"], strict=True):
        assert f["properties"]["objectType"] == "detection"
        m = f["properties"]["measurements"]
        assert m["id"] == int(nid) and m["area_px"] == int(area) and m["area_um2"] == pytest.approx(area / 16, abs=1e-3)
        ring = np.asarray(f["geometry"]["coordinates"][0])
        assert f["geometry"]["type"] == "Polygon" and (ring[0] == ring[-1]).all() and len(ring) >= 5
        # x = column, y = row, pixel (0, 0) covers [0, 1)^2: back to pixel centres for the rasterisation
        mask = polygon2mask(inst.shape, ring[:, ::-1] - 0.5)
        truth = inst == nid
        assert (mask & truth).sum() / (mask | truth).sum() > 0.95


def test_offset_types_and_streaming(tmp_path):
    inst = _instances()
    nc = np.zeros((3, *inst.shape), np.float32)
    nc[0] = 1.0
    nc[:, inst == 2] = np.array([0.1, 0.2, 0.7])[:, None]
    table = instance_table(inst, nc)
    w = NucleiGeoJSON(tmp_path / "n.geojson", mpp=0.5, type_names=["background", "epithelial", "immune"])
    w.write(table)
    w.write(table, offset=(100, 1000))  # a second window further down and right
    w.close()
    feats = json.loads((tmp_path / "n.geojson").read_text())["features"]
    assert len(feats) == 10 and w.rows == 10
    a, b = (np.asarray(feats[i]["geometry"]["coordinates"][0]) for i in (0, 5))
    np.testing.assert_allclose(b - a, np.broadcast_to([1000, 100], a.shape))
    second = feats[1]["properties"]
    assert second["classification"]["name"] == "immune" and second["measurements"]["type_prob"] == pytest.approx(0.7)


def test_empty_and_missing_contours(tmp_path):
    w = NucleiGeoJSON(tmp_path / "empty.geojson", mpp=0.5)
    w.close()
    assert json.loads((tmp_path / "empty.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
    table = instance_table(_instances())
    del table["contour"]
    w = NucleiGeoJSON(tmp_path / "bad.geojson", mpp=0.5)
    with pytest.raises(ValueError, match="bad.geojson.*contour"):
        w.write(table)
    w.close()
