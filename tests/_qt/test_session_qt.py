"""Autosave while annotating (debounced) and after adapt; restore when the same image is opened again."""

from __future__ import annotations

import numpy as np

from napari_metahistoseg._qt import session as qt_session
from napari_metahistoseg._qt.layers import layer_to_support
from napari_metahistoseg.sample_data import META, class_colours
from napari_metahistoseg.session import SessionStore

from ._helpers import PLUGIN, small_demo


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def test_autosave_and_restore(viewer, qtbot, _sessions_in_tmp):
    viewer.add_image(_image(), name="img", rgb=True)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    assert annotate.state.store.root == _sessions_in_tmp
    saver = annotate.state.autosaver
    support = annotate.create_support()
    support.paint((10, 10), 2)  # one brush dab of class 1 (label 2)
    points = annotate.create_points()
    points.add([[40, 40]])
    assert saver.timer.isActive()  # debounced: nothing written yet
    with qtbot.waitSignal(saver.saved, timeout=10_000):
        pass
    fp = saver.fingerprint(viewer.layers["img"])
    data = SessionStore(_sessions_in_tmp).load(fp)
    np.testing.assert_array_equal(data.support, layer_to_support(support.data))
    np.testing.assert_allclose(data.points, [[40, 40]])
    assert data.classes == ["background", "nucleus"] and data.meta["image_name"] == "img"

    # the same pixels opened again (under another name) offer the session; restoring brings everything back
    viewer.layers.clear()
    viewer.add_image(_image(), name="img again", rgb=True)
    assert annotate.restore_button.isEnabled() and "found" in annotate.session_label.text()
    assert annotate.restore_session()
    restored = annotate.support_combo.layer()
    np.testing.assert_array_equal(layer_to_support(restored.data), data.support)
    np.testing.assert_allclose(annotate.points_layer().data, [[40, 40]])
    assert layer_to_support(annotate.circles_layer().data)[40, 40] == 0  # point class 0 (background)
    # another image: nothing to restore
    viewer.add_image(_image(1), name="other", rgb=True)
    annotate.image_combo.set_layer(viewer.layers["other"])
    assert not annotate.restore_button.isEnabled()


def test_head_autosaved_after_adapt_and_restored(viewer, qtbot, backbone_path, _sessions_in_tmp, errors):
    from napari_metahistoseg.config import TilingConfig

    from ._helpers import small_demo

    img, sup, truth, tile = small_demo(viewer)
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    adapt.settings.backbone_edit.setText(backbone_path)
    adapt.settings.steps.setValue(1)
    adapt.settings.instances.setChecked(False)
    adapt.settings.tiling = TilingConfig(tile_px=128, halo_px=16)
    worker = adapt.run_adapt(predict=False)
    qtbot.waitUntil(lambda: adapt.runner.worker is not worker, timeout=120_000)  # race-free (see test_adapt.run)
    fp = adapt.state.autosaver.fingerprint(img)
    data = SessionStore(_sessions_in_tmp).load(fp)
    assert data.head_path is not None and data.head_path.exists()
    adapt.state.set_head(None, "")
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    annotate.image_combo.set_layer(img)
    assert annotate.restore_session() and errors == []
    assert adapt.state.head is not None and adapt.state.head_source == "session"


def test_restore_without_session_is_an_error(viewer, errors):
    viewer.add_image(_image(2), name="img", rgb=True)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    assert not annotate.restore_session() and "no saved session" in errors[-1]


def test_session_folder_is_configurable(viewer, tmp_path):
    viewer.add_image(_image(), name="img", rgb=True)
    _, annotate = viewer.window.add_plugin_dock_widget(PLUGIN, "Annotate support")
    annotate.session_edit.setText(str(tmp_path / "elsewhere"))
    annotate.session_edit.editingFinished.emit()
    annotate.create_support()
    assert annotate.state.autosaver.save_now()
    assert (tmp_path / "elsewhere").is_dir()


def _support(viewer, image_name: str, group: str):
    """A plugin support layer of the image layer named ``image_name``, as the Annotate widget or the demo makes it."""
    meta = {META: {"kind": "support", "classes": ["background", "nucleus"], "colours": class_colours(2),
                   "group": group, "image": image_name}}
    return viewer.add_labels(np.zeros((64, 64), np.uint8), name=f"support ({image_name})", metadata=meta)


def _adapt_saver(viewer, interval_ms: int = 10):
    """The autosaver of ``viewer`` with only the Adapt widget open (never the Annotate widget)."""
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    saver = adapt.state.autosaver
    saver.timer.setInterval(interval_ms)
    return saver


def test_demo_support_is_autosaved_without_the_annotate_widget(viewer, qtbot, _sessions_in_tmp):
    img, sup, _, _ = small_demo(viewer)  # the demo session's layers, there before any plugin widget
    saver = _adapt_saver(viewer)
    sup.paint((10, 10), 2)  # more strokes with napari's brush
    assert saver.timer.isActive()
    with qtbot.waitSignal(saver.saved, timeout=10_000):
        pass
    data = SessionStore(_sessions_in_tmp).load(saver.fingerprint(img))
    np.testing.assert_array_equal(data.support, layer_to_support(sup.data))
    assert data.meta["image_name"] == "tile" and data.classes == ["background", "nucleus"]


def test_every_edited_support_is_autosaved(viewer, qtbot, _sessions_in_tmp):
    saver = _adapt_saver(viewer)
    a = viewer.add_image(_image(0), name="a", rgb=True)
    b = viewer.add_image(_image(1), name="b", rgb=True)
    sup_a, sup_b = _support(viewer, "a", "ga"), _support(viewer, "b", "gb")  # added after the widget
    points = viewer.add_points(np.zeros((0, 2)), ndim=2, features={"class": np.zeros(0, np.int64)},
                               metadata={META: {"kind": "points", "group": "gb", "image": "b"}})
    sup_a.paint((10, 10), 2)
    values = np.zeros((64, 64), np.uint8)
    values[::4] = 1
    sup_b.data = values
    points.feature_defaults = {"class": 1}
    points.add([[5.0, 6.0]])
    with qtbot.waitSignal(saver.saved, timeout=10_000):
        pass
    store = SessionStore(_sessions_in_tmp)
    got_a, got_b = store.load(saver.fingerprint(a)), store.load(saver.fingerprint(b))
    np.testing.assert_array_equal(got_a.support, layer_to_support(sup_a.data))
    np.testing.assert_array_equal(got_b.support, layer_to_support(values))
    assert got_a.points is None and got_b.points.tolist() == [[5.0, 6.0]] and got_b.point_classes.tolist() == [1]


def test_pending_edits_survive_removal_and_a_missing_image(viewer, _sessions_in_tmp, monkeypatch):
    warnings: list[str] = []
    monkeypatch.setattr(qt_session, "show_warning", warnings.append)
    img = viewer.add_image(_image(), name="img", rgb=True)
    saver = _adapt_saver(viewer, interval_ms=60_000)  # the timer never fires here
    store, fp = SessionStore(_sessions_in_tmp), saver.fingerprint(img)
    sup = _support(viewer, "img", "g")
    sup.paint((10, 10), 2)
    viewer.layers.remove(sup)  # pending edits are written from the removed layer
    np.testing.assert_array_equal(store.load(fp).support, layer_to_support(sup.data))
    assert not saver.timer.isActive()
    # the image removed before its support (as closing the viewer may do): the support's edits are written first
    other = _support(viewer, "img", "g2")
    other.paint((30, 30), 1)
    viewer.layers.remove(img)
    np.testing.assert_array_equal(store.load(fp).support, layer_to_support(other.data))
    # its image no longer open: the edits are kept (warned once), and written when an image of that name is back
    other.paint((50, 50), 2)
    assert not saver.save_now() and not saver.save_now()
    assert len(warnings) == 1 and other.name in warnings[0] and "'img'" in warnings[0]
    viewer.add_image(_image(), name="img", rgb=True)
    assert saver.save_now() and len(warnings) == 1
    np.testing.assert_array_equal(store.load(fp).support, layer_to_support(other.data))
