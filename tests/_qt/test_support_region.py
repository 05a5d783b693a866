"""Support regions on slide-sized images: the support layer covers the visible field, not the slide; Adapt,
circles, autosave/restore, import and Evaluate all place it by its origin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tifffile

from napari_metahistoseg._qt import layers as qt_layers
from napari_metahistoseg._qt.common import unwrap
from napari_metahistoseg._qt.layers import find_layers
from napari_metahistoseg.config import HoVerPostConfig, TilingConfig
from napari_metahistoseg.data.synthetic import synthetic_tile
from napari_metahistoseg.sample_data import support_to_layer

from ._helpers import PLUGIN
from .test_adapt import run

REGION = (20, 84, 40, 104)  # the "visible field" (r0, r1, c0, c1) of the 160² "slide"


@pytest.fixture
def widgets(viewer, backbone_path, monkeypatch, tmp_path):
    from napari_metahistoseg._qt import jobs

    monkeypatch.setenv(jobs.PREDICTIONS_ENV, str(tmp_path / "pred"))
    monkeypatch.setattr(qt_layers, "visible_region", lambda layer, max_fraction=0.8: REGION)
    tile = synthetic_tile((160, 160), seed=4, mpp=0.5)
    img = viewer.add_image(tile.image, name="slide", rgb=True, metadata={"mpp": 0.5})
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    large = TilingConfig(tile_px=128, halo_px=16, stream_above_mp=0.01)  # 160² = 0.026 MP: a "slide"
    annotate.tiling = large
    adapt.settings.tiling = large
    adapt.settings.backbone_edit.setText(backbone_path)
    adapt.settings.steps.setValue(2)
    adapt.settings.fov_first.setChecked(False)
    adapt.settings.hover = HoVerPostConfig(marker_threshold=1.0)
    return img, tile, annotate, adapt


def _paint(support, tile):
    r0, c0 = support.metadata["metahistoseg"]["origin"]
    sem = tile.semantic[r0:r0 + 64, c0:c0 + 64]
    strokes = np.zeros((64, 64), np.uint8)
    strokes[::4] = support_to_layer(sem)[::4]  # every 4th row of the region painted with the true class
    support.data = strokes
    return strokes


def test_support_region_end_to_end(viewer, qtbot, widgets, errors, tmp_path):
    img, tile, annotate, adapt = widgets
    support = annotate.create_support()
    r0, r1, c0, c1 = REGION
    assert support.data.shape == (r1 - r0, c1 - c0) and support.metadata["metahistoseg"]["origin"] == [r0, c0]
    assert tuple(support.translate) == (r0, c0)  # drawn over its region of the image
    strokes = _paint(support, tile)
    # circles of centroid clicks live in the same region; clicks are in image coordinates
    points = annotate.create_points()
    [circles] = find_layers(viewer, "circles")
    assert circles.data.shape == (64, 64) and tuple(circles.translate) == (r0, c0)
    points.data = np.array([[r0 + 30.0, c0 + 30.0], [150.0, 150.0]])  # the second lies outside the region
    points.features = {"class": [1, 1]}
    assert circles.data[30, 30] == 2 and circles.data.sum() > 0
    # Adapt uses the region (and context around it), then predicts the slide streamed
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    head = adapt.state.head
    [sup] = head.provenance["support"]
    assert sup["labelled_px"] > 0 and sup["shape"][0] >= 64  # the painted window plus context, not the slide
    [sem] = find_layers(viewer, "prediction")
    assert sem.data.shape == (160, 160)
    # autosave writes the region with its origin; restore brings it back where it was
    assert annotate.state.autosaver.save_now()
    data = annotate.state.store.load(annotate.state.autosaver.fingerprint(img))
    assert data.support is None and [(v.shape, o) for v, o in data.regions] == [((64, 64), (r0, c0))]
    assert data.points.tolist() == [[r0 + 30.0, c0 + 30.0], [150.0, 150.0]]
    for ly in [support, circles, points]:
        viewer.layers.remove(ly)
    assert annotate.restore_session() and errors == []
    [back] = find_layers(viewer, "support")
    assert back.metadata["metahistoseg"]["origin"] == [r0, c0] and np.array_equal(back.data, strokes)
    # Evaluate with the support as truth scores the prediction's part under the region
    _, evaluate = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate")
    evaluate.truth_combo.set_layer(back)
    evaluate.pred_inst_combo.setCurrentIndex(0)
    evaluate.evaluate()
    qtbot.waitUntil(lambda: not evaluate.runner.busy, timeout=20000)
    assert errors == [] and 0 <= evaluate.results["mIoU"] <= 1


def test_import_on_a_slide_makes_a_region_and_refuses_losing_labels(viewer, widgets, errors, tmp_path):
    img, tile, annotate, _ = widgets
    mask = np.full((160, 160), 255, np.uint8)  # file convention: class ids, 255 = unknown
    mask[100:120, 10:30] = 1
    tifffile.imwrite(tmp_path / "m.tif", mask)
    assert annotate.import_file(tmp_path / "m.tif") and errors == []
    [support] = find_layers(viewer, "support")
    assert support.metadata["metahistoseg"]["origin"] == [100, 10] and support.data.shape == (20, 20)
    assert (support.data == 2).all()  # layer convention: class k painted as k + 1
    far = np.full((160, 160), 255, np.uint8)
    far[0:5, 150:155] = 0
    tifffile.imwrite(tmp_path / "far.tif", far)
    assert not annotate.import_file(tmp_path / "far.tif")
    assert "beyond the support region" in errors[-1] and (support.data == 2).all()  # nothing changed


def test_small_images_keep_image_sized_supports(viewer, widgets):
    img, tile, annotate, _ = widgets
    annotate.tiling = dataclasses.replace(annotate.tiling, stream_above_mp=16.0)
    support = annotate.create_support()
    assert support.data.shape == (160, 160) and "origin" not in support.metadata["metahistoseg"]


def test_two_regions_adapt_together_and_are_saved_apart(viewer, qtbot, widgets, errors, monkeypatch):
    img, tile, annotate, adapt = widgets
    first = annotate.create_support()
    strokes_a = _paint(first, tile)
    monkeypatch.setattr(qt_layers, "visible_region", lambda layer, max_fraction=0.8: (90, 154, 80, 144))
    second = annotate.create_support()  # pan elsewhere, press the button again: a second region
    assert second.metadata["metahistoseg"]["origin"] == [90, 80]
    assert unwrap(annotate.support_combo.layer()) is unwrap(second)  # the new layer is the one chosen
    strokes_b = _paint(second, tile)
    adapt.settings.instances.setChecked(False)
    adapt.support_combo.set_layer(second)
    run(qtbot, adapt.run_adapt(predict=False), adapt)
    assert errors == [] and len(adapt.state.head.provenance["support"]) == 2  # both regions, one support each
    adapt.settings.live.setChecked(True)  # live mode follows strokes in every region, not only the chosen one
    first.events.paint(value=[])
    assert adapt._live_timer.isActive()
    adapt._live_timer.stop()
    adapt.settings.live.setChecked(False)
    assert annotate.state.autosaver.save_now()  # the second (watched) region; the first was saved on switching
    data = annotate.state.store.load(annotate.state.autosaver.fingerprint(img))
    assert sorted(o for _, o in data.regions) == [(20, 40), (90, 80)]
    for ly in (first, second):
        viewer.layers.remove(ly)
    assert annotate.restore_session() and errors == []
    back = {tuple(ly.metadata["metahistoseg"]["origin"]): ly.data for ly in find_layers(viewer, "support")}
    assert np.array_equal(back[(20, 40)], strokes_a) and np.array_equal(back[(90, 80)], strokes_b)
