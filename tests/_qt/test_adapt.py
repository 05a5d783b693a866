"""Adapt & predict end to end on a tiny random backbone: layers, features, preview, cancel, errors, live mode."""

from __future__ import annotations

import numpy as np
import pytest

from napari_metahistoseg._qt import adapt_settings
from napari_metahistoseg._qt.layers import find_layers, kind_of
from napari_metahistoseg.config import HoVerPostConfig, TilingConfig

from ._helpers import HOVER_NAMES, PLUGIN, small_demo

TIMEOUT_MS = 120_000


@pytest.fixture
def adapt(viewer, backbone_path):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    widget.settings.backbone_edit.setText(backbone_path)
    widget.settings.steps.setValue(2)
    widget.settings.fov_first.setChecked(False)
    widget.settings.tiling = TilingConfig(tile_px=128, halo_px=16)
    # random HV maps mark edges everywhere: let every mask pixel seed a marker so that nuclei come out
    widget.settings.hover = HoVerPostConfig(marker_threshold=1.0)
    return widget


def run(qtbot, worker, widget):
    """Wait until ``widget``'s job runner has handled the end of ``worker``. Race-free even when the job ends
    before this is called (an immediate error): the runner's slot was connected before the worker started, so
    its queued ``finished`` call is processed here, whereas a ``waitSignal`` connected now could miss it."""
    assert worker is not None
    qtbot.waitUntil(lambda: widget.runner.worker is not worker, timeout=TIMEOUT_MS)


def prediction_layers(viewer):
    return [ly for ly in viewer.layers if kind_of(ly) in ("prediction", "instances", "objects", "preview", "mitosis")]


def test_adapt_then_predict_end_to_end(viewer, qtbot, adapt, errors):
    img, sup, truth, tile = small_demo(viewer)
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    assert adapt.state.head is not None and adapt.state.head.classes == ["background", "nucleus"]
    assert adapt.state.head.colours == sup.metadata["metahistoseg"]["colours"]
    assert len(adapt.curve.values) == 2 and adapt.status.text() == "Adapt: done"
    [sem] = find_layers(viewer, "prediction")
    [inst] = find_layers(viewer, "instances")
    assert sem.data.shape == (128, 128) and set(np.unique(sem.data)) <= {0, 1}
    assert inst.data.max() > 0
    feats = inst.features
    assert {"index", "centroid_row", "centroid_col", "area_px", "type", "type_prob", "type_name"} <= set(feats.columns)
    assert set(feats["type_name"]) <= set(HOVER_NAMES)
    assert sorted(feats["index"]) == sorted(np.unique(inst.data[inst.data > 0]))
    assert adapt.last_created == [sem, inst]
    # Predict again with the same head: layers are updated in place, not duplicated
    adapt.settings.instances.setChecked(False)
    run(qtbot, adapt.run_predict(), adapt)
    assert len(find_layers(viewer, "prediction")) == 1 and adapt.last_created == []


def test_gland_object_instances_layer(viewer, qtbot, adapt, errors):
    """The 'gland / object instances' box adds an objects Labels layer with the per-object table as features;
    the Evaluate widget offers it as predicted instances."""
    from napari_metahistoseg.config import ObjectPostConfig

    small_demo(viewer)
    adapt.settings.instances.setChecked(False)
    adapt.settings.objects.setChecked(True)
    adapt.settings.objects_cfg = ObjectPostConfig(min_object_area_um2=5.0, split_depth_um=2.0, smooth_um=1.0)
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    [sem] = find_layers(viewer, "prediction")
    [obj] = find_layers(viewer, "objects")
    assert find_layers(viewer, "instances") == [] and obj.data.shape == sem.data.shape
    ids = sorted(set(np.unique(obj.data).tolist()) - {0})
    assert ids and sorted(obj.features["index"]) == ids
    assert set(obj.features["class_name"]) <= {"background", "nucleus"} and "area_px" in obj.features
    _, ev = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate")
    assert obj in ev.pred_inst_combo.candidates() and obj not in ev.truth_combo.candidates()


def viewer_backbone_decoders(widget):
    from napari_metahistoseg.pipeline import load_backbone

    return load_backbone(widget.settings.backbone_edit.text()).model.backbone.decoders


def test_head_label_shows_the_calibration(adapt):
    import dataclasses

    from napari_metahistoseg.config import MAMLConfig
    from napari_metahistoseg.pipeline import AdaptedHead

    head = AdaptedHead(["background", "gland"], {}, "x", MAMLConfig(), 0.5, {})
    adapt.state.set_head(head, "adapted")
    assert adapt.head_label.text() == "head: background, gland (adapted)"  # nothing calibrated (strokes)
    calibrated = dataclasses.replace(head, provenance={"calibrated_threshold": 0.45, "calibrated_smoothing_um": 4.0})
    adapt.state.set_head(calibrated, "adapted")
    assert adapt.head_label.text() == "head: background, gland (adapted) · threshold 0.45 · smoothing 4 µm"
    coloured = dataclasses.replace(head, provenance={"colour_sigmas_um": [0.0, 1.0]})
    adapt.state.set_head(coloured, "adapted")
    assert adapt.head_label.text() == "head: background, gland (adapted) · colour"
    adapt.state.set_head(None, "")
    assert adapt.head_label.text() == "no head yet"


def test_full_mode_adapts_decoder(viewer, qtbot, adapt, errors):
    small_demo(viewer)
    assert not adapt.settings.decoder_blocks.isEnabled() and adapt.settings.calibrate.isEnabled()
    adapt.settings.calibrate.setChecked(False)
    assert adapt.settings.maml_config().calibrate_threshold is False
    assert adapt.settings.maml_config().calibrate_smoothing is False
    assert adapt.settings.colour.isEnabled() and adapt.settings.maml_config().colour_features is True
    adapt.settings.colour.setChecked(False)
    assert adapt.settings.maml_config().colour_features is False
    adapt.settings.mode_combo.setCurrentIndex(1)
    assert adapt.settings.decoder_blocks.isEnabled() and not adapt.settings.calibrate.isEnabled()
    assert not adapt.settings.colour.isEnabled()
    adapt.settings.decoder_blocks.setValue(1)
    adapt.settings.instances.setChecked(False)
    run(qtbot, adapt.run_adapt(predict=False), adapt)
    assert errors == [] and adapt.state.head.maml.adapt == "decoder" and adapt.state.head.maml.decoder_blocks == 1
    blocks = {k.split(".")[2] for k in adapt.state.head.state if k.startswith("backbone.")}
    assert blocks == {str(len(viewer_backbone_decoders(adapt)) - 1)}
    assert prediction_layers(viewer) == []


def test_visible_field_first(viewer, qtbot, adapt, monkeypatch):
    small_demo(viewer)
    adapt.settings.fov_first.setChecked(True)
    monkeypatch.setattr(adapt_settings, "visible_region", lambda layer: (0, 64, 32, 96))
    seen = []
    worker = adapt.run_adapt()
    worker.yielded.connect(lambda p: seen.append(p["stage"]) if p["stage"] == "preview" else None)
    worker.yielded.connect(lambda p: seen.append(len(find_layers(viewer, "preview"))) if p["stage"] == "preview"
                           else None)
    run(qtbot, worker, adapt)
    assert seen == ["preview", 1]
    assert find_layers(viewer, "preview") == []  # the preview is replaced by the full prediction
    assert find_layers(viewer, "prediction")[0].data.shape == (128, 128)


def test_test_time_augmentation_setting(viewer, qtbot, adapt, errors):
    img, *_ = small_demo(viewer)
    assert adapt.settings.predict_settings(img).tiling.tta_variants == 1  # off by default, as the library
    adapt.settings.tta.setCurrentText("TTA: 4 flips")
    assert adapt.settings.predict_settings(img).tiling.tta_variants == 4
    assert adapt.settings.tiling.tta_variants == 1  # the panel's base tiling is not changed
    adapt.settings.instances.setChecked(False)
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == [] and find_layers(viewer, "prediction")[0].data.shape == (128, 128)


def test_large_image_streams_into_zarr(viewer, qtbot, adapt, errors, tmp_path, monkeypatch):
    """An image above ``stream_above_mp`` is never read whole: adaptation gets the painted window, prediction
    streams into a zarr store (visible field first, as a region-sized preview) and the layers show its arrays."""
    import dataclasses

    import zarr

    from napari_metahistoseg._qt import jobs

    img, sup, truth, tile = small_demo(viewer, size=160)
    # 160² = 0.026 MP is "large"; its labels get levels down to 64 px (80², 40²), shown multiscale
    adapt.settings.tiling = dataclasses.replace(adapt.settings.tiling, stream_above_mp=0.01, pyramid_min_px=64)
    adapt.settings.objects.setChecked(True)
    adapt.settings.fov_first.setChecked(True)
    monkeypatch.setenv(jobs.PREDICTIONS_ENV, str(tmp_path))
    monkeypatch.setattr(adapt_settings, "visible_region", lambda layer: (0, 64, 32, 96))
    reads = []
    real = jobs.open_array
    monkeypatch.setattr(jobs, "open_array", lambda raw, name: reads.append(name) or real(raw, name))
    previews = []
    worker = adapt.run_adapt()
    worker.yielded.connect(lambda p: previews.append([ly.data.shape for ly in find_layers(viewer, "preview")])
                           if p["stage"] == "preview" else None)
    run(qtbot, worker, adapt)
    assert errors == [] and reads == ["tile"]
    assert previews == [[(64, 64)]]  # the visible field only, not a full-size array
    assert find_layers(viewer, "preview") == []
    [sem] = find_layers(viewer, "prediction")
    [inst] = find_layers(viewer, "instances")
    [obj] = find_layers(viewer, "objects")
    for ly in (sem, inst, obj):
        assert ly.multiscale and [a.shape for a in ly.data] == [(160, 160), (80, 80), (40, 40)]
        assert all(isinstance(a, zarr.Array) for a in ly.data)
    [store] = list(tmp_path.glob("tile-*.zarr"))
    assert zarr.open_group(str(store), mode="r").attrs["complete"] is True
    assert sem.metadata["metahistoseg"]["store"] == str(store)
    assert sorted(inst.features["index"]) == sorted(set(np.unique(inst.data[0][:])) - {0})
    assert "centroid_row" in inst.features and "type_name" in inst.features and "bbox_max_col" in inst.features
    assert {"class_name", "area_um2"} <= set(obj.features.columns)
    # predicting again writes a new store; the layers move to it and only the newest two stores are kept
    for _ in range(2):
        run(qtbot, adapt.run_predict(), adapt)
    qtbot.waitUntil(lambda: store not in tmp_path.glob("tile-*.zarr"), timeout=10000)  # pruned off the GUI thread
    stores = sorted(tmp_path.glob("tile-*.zarr"))
    assert len(stores) == 2
    [sem] = find_layers(viewer, "prediction")
    assert sem.metadata["metahistoseg"]["store"] == str(stores[-1]) and errors == []
    # a live re-adaptation (after a stroke) predicts the visible field only
    run(qtbot, adapt.run_adapt(live=True), adapt)
    [sem] = find_layers(viewer, "prediction")
    live = zarr.open_group(sem.metadata["metahistoseg"]["store"], mode="r")
    assert live.attrs["complete"] is False and "objects" not in live
    outside = np.ones((160, 160), bool)
    outside[0:64, 32:96] = False
    assert not np.asarray(sem.data[0])[outside].any() and errors == []
    # its levels were built for the visible field only, and agree with the full-resolution labels
    assert np.array_equal(np.asarray(sem.data[1]), np.asarray(sem.data[0])[::2, ::2])
    [inst] = find_layers(viewer, "instances")  # the field's nuclei come with their table
    assert set(inst.features["index"]) == set(np.unique(np.asarray(inst.data[0]))) - {0}


def test_cancel_leaves_viewer_consistent(viewer, qtbot, adapt):
    small_demo(viewer)
    names = [ly.name for ly in viewer.layers]
    worker = adapt.run_adapt()
    adapt.cancel_button.click()
    run(qtbot, worker, adapt)
    assert [ly.name for ly in viewer.layers] == names
    assert adapt.status.text() == "Adapt: cancelled" and adapt.adapt_button.isEnabled()


def test_cancel_after_preview_removes_it(viewer, qtbot, adapt, monkeypatch):
    small_demo(viewer)
    adapt.settings.fov_first.setChecked(True)
    monkeypatch.setattr(adapt_settings, "visible_region", lambda layer: (0, 64, 0, 64))
    names = [ly.name for ly in viewer.layers]
    worker = adapt.run_adapt()
    worker.yielded.connect(lambda p: adapt.runner.cancel() if p["stage"] == "preview" else None)
    run(qtbot, worker, adapt)
    assert [ly.name for ly in viewer.layers] == names
    assert adapt.state.head is not None  # the head adapted before the cancel is kept


def test_errors_are_notified_not_raised(viewer, qtbot, adapt, errors, tmp_path):
    assert adapt.run_adapt() is None and "no image layer" in errors[-1]
    img, sup, truth, tile = small_demo(viewer)
    sup.data = np.zeros_like(sup.data)
    run(qtbot, adapt.run_adapt(), adapt)
    assert "no labelled pixels" in errors[-1] and prediction_layers(viewer) == []
    adapt.settings.backbone_edit.setText(str(tmp_path / "missing"))
    sup.data = (np.arange(128 * 128).reshape(128, 128) % 3).astype(np.uint8)
    run(qtbot, adapt.run_adapt(), adapt)
    assert "missing.json" in errors[-1] and errors[-1].startswith("Adapt failed")
    assert adapt.run_predict() is None and "no adapted head" in errors[-1]
    for box in adapt.settings.device_boxes.values():
        box.setChecked(False)
    assert adapt.run_adapt() is None and "no device selected" in errors[-1]
    for box in adapt.settings.device_boxes.values():
        box.setChecked(True)
    sup.data = np.ones((64, 64), np.uint8)  # a support layer of another image (not a region of this one)
    assert adapt.run_adapt() is None and "differ in size" in errors[-1]


def test_live_mode_readapts_after_strokes(viewer, qtbot, adapt):
    img, sup, truth, tile = small_demo(viewer)
    adapt.settings.instances.setChecked(False)
    adapt.settings.live.setChecked(True)
    sup.events.paint(value=[])
    assert adapt._live_timer.isActive()
    with qtbot.waitSignal(adapt.runner.stopped, timeout=TIMEOUT_MS):
        pass
    assert adapt.state.head is not None and len(find_layers(viewer, "prediction")) == 1
    adapt.settings.live.setChecked(False)
    sup.events.paint(value=[])
    assert not adapt._live_timer.isActive()


def test_device_checkboxes_list_available_devices(adapt):
    from napari_metahistoseg.devices import available_devices

    assert list(adapt.settings.device_boxes) == available_devices()
    gpus = [d for d in available_devices() if d.startswith("cuda")]
    assert adapt.settings.devices() == (gpus[:1] or ["cpu"])  # the first CUDA GPU is ticked when there is one


def test_the_first_gpu_is_ticked_by_default(qtbot, monkeypatch):
    from napari_metahistoseg._qt import adapt_settings

    monkeypatch.setattr(adapt_settings, "available_devices", lambda: ["cpu", "cuda:0", "cuda:1"])
    monkeypatch.setattr(adapt_settings, "device_label", lambda d: d)
    settings = adapt_settings.AdaptSettings("default")
    qtbot.addWidget(settings)
    assert settings.devices() == ["cuda:0"]
    assert not settings.device_boxes["cpu"].isChecked() and not settings.device_boxes["cuda:1"].isChecked()


def test_mitosis_candidates_with_threshold(viewer, qtbot, adapt, tmp_path, errors, monkeypatch):
    mitosis = pytest.importorskip("napari_metahistoseg.mitosis")  # the GUI hides the option without it
    from napari_metahistoseg._qt import jobs
    from napari_metahistoseg.config import MitosisConfig

    MitosisNet, save_mitosis_model = mitosis.MitosisNet, mitosis.save_mitosis_model

    assert jobs.MITOSIS_AVAILABLE and adapt.settings.mitosis.isVisibleTo(adapt)
    save_mitosis_model(MitosisNet(MitosisConfig(channels=(8, 8))).eval(), tmp_path / "mit")
    small_demo(viewer)
    adapt.settings.mitosis.setChecked(True)
    adapt.settings.mitosis_edit.setText(str(tmp_path / "mit"))
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    [inst] = find_layers(viewer, "instances")
    [mit] = find_layers(viewer, "mitosis")
    probs = mit.features["probability"].to_numpy()
    assert len(mit.data) == len(inst.features) > 0 and np.all((probs >= 0) & (probs <= 1))
    adapt.settings.threshold.setValue(0)
    assert mit.shown.all()
    adapt.settings.threshold.setValue(100)
    assert not mit.shown.any() and len(mit.data) == len(probs)  # hidden, not deleted
    # a streamed (slide-sized) prediction shows its candidates too (they used to be computed but not shown)
    import dataclasses

    import zarr

    monkeypatch.setenv(jobs.PREDICTIONS_ENV, str(tmp_path / "pred"))
    adapt.settings.tiling = dataclasses.replace(adapt.settings.tiling, stream_above_mp=0.01)
    viewer.layers.remove(mit)
    run(qtbot, adapt.run_predict(), adapt)
    assert errors == []
    [inst] = find_layers(viewer, "instances")
    [mit] = find_layers(viewer, "mitosis")
    assert isinstance(inst.data, zarr.Array) and len(mit.data) == len(inst.features) > 0


def test_visible_region_follows_the_camera(make_napari_viewer, qtbot):
    from napari_metahistoseg._qt.layers import visible_region

    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(np.zeros((400, 300, 3), np.uint8), rgb=True)
    qtbot.waitUntil(lambda: np.asarray(layer.corner_pixels).any(), timeout=10_000)
    assert visible_region(layer) is None  # the whole image is shown: predict it in one go
    viewer.scene.camera.zoom *= 4
    viewer.scene.camera.center = (0, 100, 150)
    qtbot.waitUntil(lambda: visible_region(layer) is not None, timeout=10_000)
    r0, r1, c0, c1 = visible_region(layer)
    assert r0 < 100 < r1 and c0 < 150 < c1 and (r1 - r0) * (c1 - c0) < 0.5 * 400 * 300


def test_visible_region_of_a_multiscale_image_is_in_level_0_pixels():
    import napari

    from napari_metahistoseg._qt.layers import visible_region

    layer = napari.layers.Image([np.zeros((400, 300)), np.zeros((200, 150)), np.zeros((100, 75))])
    layer._data_level = 2  # zoomed out: napari reports the corners in pixels of level 2 (4x coarser)
    layer.corner_pixels = np.array([[10, 20], [29, 39]])
    assert visible_region(layer) == (40, 120, 80, 160)
    layer._data_level = 0
    layer.corner_pixels = np.array([[10, 20], [29, 39]])
    assert visible_region(layer) == (10, 30, 20, 40)


def test_clicked_centroids_give_detected_cells(viewer, qtbot, adapt, errors):
    """A head adapted on clicked centroids (circles) also detects the cells as points, at the circles' size; the
    radius goes into the head's provenance (so Predict alone, an export, the CLI detect them too) and Evaluate
    scores truth points against those cells."""
    from napari_metahistoseg._qt.evaluate import evaluate_layers
    from napari_metahistoseg.sample_data import META

    img, sup, truth, tile = small_demo(viewer)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    annotate.support_combo.set_layer(sup)
    points = annotate.create_points()
    annotate.class_combo.setCurrentIndex(1)
    points.add([[30, 30], [90, 70]])
    assert annotate.circles_layer().metadata[META]["radius_px"] == 12.0
    annotate.radius.setValue(6)  # a smaller circle: the radius recorded follows
    adapt.support_combo.set_layer(sup)
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    prov = adapt.state.head.provenance
    assert prov["support_kind"] == "points" and prov["points_radius_model_px"] == pytest.approx(6.0)
    [cells] = find_layers(viewer, "cells")
    assert {"class", "class_name", "probability"} <= set(cells.features.columns)
    assert set(cells.features["class_name"]) <= {"nucleus"}
    n = len(cells.data)
    run(qtbot, adapt.run_predict(), adapt)  # Predict alone: the head's provenance brings the cells back
    assert len(find_layers(viewer, "cells")) == 1 and len(find_layers(viewer, "cells")[0].data) == n
    truth_pts = viewer.add_points(np.vstack([np.asarray(cells.data).reshape(-1, 2), [[-100.0, -100.0]]]),
                                  name="truth pts")  # the cells, and a point far from every cell
    [sem] = find_layers(viewer, "prediction")
    res = evaluate_layers(sem, None, truth_points=truth_pts, pred_points=cells)
    assert res["F1"] == pytest.approx(2 * n / (2 * n + 1))  # every cell matches; the extra truth point does not


def test_clicked_centroids_on_a_slide_give_streamed_cells(viewer, qtbot, adapt, errors, tmp_path, monkeypatch):
    """On an image predicted streamed (a slide), the cells of a head adapted on clicked centroids are detected
    window by window over the stored foreground map and shown as the same Points layer."""
    import dataclasses

    from napari_metahistoseg._qt import jobs

    img, sup, truth, tile = small_demo(viewer, size=160)
    adapt.settings.tiling = dataclasses.replace(adapt.settings.tiling, stream_above_mp=0.01, instance_window_px=64)
    monkeypatch.setenv(jobs.PREDICTIONS_ENV, str(tmp_path))
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    annotate.support_combo.set_layer(sup)
    points = annotate.create_points()
    annotate.class_combo.setCurrentIndex(1)
    points.add([[30, 30], [100, 120]])
    adapt.support_combo.set_layer(sup)
    run(qtbot, adapt.run_adapt(), adapt)
    assert errors == []
    [sem] = find_layers(viewer, "prediction")
    assert sem.metadata["metahistoseg"].get("store")  # streamed
    [cells] = find_layers(viewer, "cells")
    assert {"class", "class_name", "probability"} <= set(cells.features.columns)
    [csv_path] = list(tmp_path.glob("tile-*.points.csv"))
    assert len(cells.data) == len(csv_path.read_text().splitlines()) - 1
