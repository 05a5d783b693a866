"""Autosave while annotating (debounced) and after adapt; restore when the same image is opened again."""

from __future__ import annotations

import numpy as np

from napari_metahistoseg._qt.layers import layer_to_support
from napari_metahistoseg.session import SessionStore

from ._helpers import PLUGIN


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
