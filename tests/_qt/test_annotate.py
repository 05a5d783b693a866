"""Annotate widget: support layer, classes, centroid circles (live), import with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from napari_metahistoseg._qt.layers import kind_of, layer_to_support
from napari_metahistoseg.data.task import IGNORE
from napari_metahistoseg.sample_data import META

from ._helpers import PLUGIN


@pytest.fixture
def annotate(viewer):
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), name="img", rgb=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    return widget


def test_create_support_layer(viewer, annotate):
    layer = annotate.create_support()
    assert kind_of(layer) == "support" and layer.data.shape == (64, 64) and not layer.data.any()
    meta = layer.metadata[META]
    assert meta["classes"] == ["background", "nucleus"] and meta["image"] == "img"
    assert layer.mode == "paint" and layer.selected_label == 1  # class 0 (background) is label 1, never 0
    annotate.class_combo.setCurrentIndex(1)
    assert layer.selected_label == 2
    assert np.all(layer_to_support(layer.data) == IGNORE)  # unpainted = unknown
    # a second support layer becomes the chosen one (napari gives plugins proxies of the layers: the combo
    # compares the layers behind them)
    from napari_metahistoseg._qt.common import unwrap

    second = annotate.create_support()
    assert unwrap(annotate.support_combo.layer()) is unwrap(second)
    annotate.support_combo.set_layer(layer)
    assert unwrap(annotate.support_combo.layer()) is unwrap(layer)


def test_edit_classes_renames_and_recolours(viewer, annotate):
    layer = annotate.create_support()
    annotate.classes_edit.setText("background, tumour, stroma")
    annotate.apply_classes()
    assert layer.metadata[META]["classes"] == ["background", "tumour", "stroma"]
    assert annotate.class_combo.count() == 3
    assert layer.colormap.map(np.array([3]))[0, 3] == 1  # label 3 (class 2) is now opaque


def test_points_become_circles_live(viewer, annotate):
    points = annotate.create_points()
    circles = annotate.circles_layer()
    assert kind_of(points) == "points" and kind_of(circles) == "circles"
    annotate.class_combo.setCurrentIndex(1)
    points.add([[20, 20]])
    sem = layer_to_support(circles.data)
    assert sem[20, 20] == 1 and sem[20, 31] == 1 and sem[20, 33] == IGNORE  # radius 12 px
    annotate.radius.setValue(5)
    sem = layer_to_support(circles.data)
    assert sem[20, 25] == 1 and sem[20, 26] == IGNORE
    annotate.unit.setCurrentText("um")
    annotate.mpp.setValue(0.5)  # 5 µm at 0.5 µm/px = 10 px
    assert layer_to_support(circles.data)[20, 30] == 1
    points.mode = "select"
    points.selected_data = {0}
    annotate.class_combo.setCurrentIndex(0)  # re-class the selected point
    assert layer_to_support(circles.data)[20, 20] == 0


def test_switching_class_between_clicks_keeps_the_last_click(viewer, annotate):
    points = annotate.create_points()
    assert str(points.mode) == "add"
    annotate.class_combo.setCurrentIndex(1)
    points.add([[20, 20]])  # napari selects a point it adds
    annotate.class_combo.setCurrentIndex(0)  # the class of the next click
    points.add([[50, 50]])
    assert points.features["class"].tolist() == [1, 0]
    sem = layer_to_support(annotate.circles_layer().data)
    assert sem[20, 20] == 1 and sem[50, 50] == 0


def test_strokes_win_over_circles(viewer, annotate):
    from napari_metahistoseg._qt.layers import merged_support

    support = annotate.create_support()
    points = annotate.create_points()
    annotate.class_combo.setCurrentIndex(1)
    points.add([[30, 30]])
    support.data[30, 30] = 1  # background painted on top of the nucleus click
    merged = merged_support(support, annotate.circles_layer())
    assert merged[30, 30] == 0 and merged[30, 32] == 1 and merged[0, 0] == IGNORE


def test_import_mask_points_xml(viewer, annotate, tmp_path):
    from PIL import Image

    mask = np.full((64, 64), IGNORE, np.uint8)
    mask[:4] = 0
    mask[10:14, 10:14] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert annotate.import_file(tmp_path / "m.png")
    sup = layer_to_support(annotate.support_combo.layer().data)
    np.testing.assert_array_equal(sup, mask)
    (tmp_path / "p.csv").write_text("row,col,class\n40,40,1\n50,10,0\n")
    assert annotate.import_file(tmp_path / "p.csv")
    points = annotate.points_layer()
    assert len(points.data) == 2 and list(points.features["class"]) == [1, 0]
    assert layer_to_support(annotate.circles_layer().data)[40, 40] == 1
    xml = ('<Annotations MicronsPerPixel="0.25"><Annotation><Regions><Region Id="1"><Vertices>'
           '<Vertex X="30" Y="50"/><Vertex X="36" Y="50"/><Vertex X="36" Y="56"/><Vertex X="30" Y="56"/>'
           '</Vertices></Region></Regions></Annotation></Annotations>')
    (tmp_path / "a.xml").write_text(xml)
    assert annotate.import_file(tmp_path / "a.xml")
    sup = layer_to_support(annotate.support_combo.layer().data)
    assert sup[52, 32] == 1 and sup[0, 0] == 0 and sup[11, 11] == 1  # earlier imports kept


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.png", b"\x89PNG\r\n\x1a\n garbage", "bad.png"),
    ("bad.csv", b"row,col\n1,nope\n", "bad.csv: line 2"),
    ("bad.xml", b"<Annotations><Region", "bad.xml"),
    ("big.png", None, "big.png"),
    ("notes.txt", b"hello", "unsupported annotation file"),
])
def test_bad_import_shows_error_and_keeps_annotations(viewer, annotate, errors, tmp_path, name, content, message):
    support = annotate.create_support()
    support.data[5:9, 5:9] = 2
    before = support.data.copy()
    path = tmp_path / name
    if content is None:  # right format, wrong size
        from PIL import Image

        Image.fromarray(np.zeros((10, 10), np.uint8)).save(path)
    else:
        path.write_bytes(content)
    assert not annotate.import_file(path)
    assert len(errors) == 1 and message in errors[0] and errors[0].startswith("Import failed")
    np.testing.assert_array_equal(support.data, before)
    assert annotate.points_layer() is None


def test_mask_with_unknown_class_is_refused(viewer, annotate, errors, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "m.png")
    assert not annotate.import_file(tmp_path / "m.png")
    assert "class ids [7]" in errors[0] and "m.png" in errors[0]
