"""Mitosis classifier panel: clicked examples (class of the next clicks chosen in the panel) → an adapted model saved
under the sessions folder, loadable, calling the examples as labelled, and handed to the docked Adapt & predict
panel; bad examples give one clear error and start nothing."""

from __future__ import annotations

import numpy as np
import pytest
from napari.utils.colormaps.standardize_color import transform_color

from napari_metahistoseg._qt.common import unwrap
from napari_metahistoseg._qt.mitosis import COLOURS, MitosisWidget
from napari_metahistoseg.mitosis import classify, extract_patches, load_mitosis_model

from ._helpers import PLUGIN

MITOTIC = [(60, 60), (60, 200), (200, 60), (330, 330)]  # (row, col): dark round discs
NOT_MITOTIC = [(200, 200), (60, 330), (330, 60), (330, 200)]  # light small ellipses


def blobs() -> np.ndarray:
    """A 400x400 RGB image the bundled classifier calls all mitotic: adaptation must separate the two kinds."""
    rr, cc = np.indices((400, 400))
    img = np.full((400, 400, 3), 225, np.uint8)
    for r, c in MITOTIC:
        img[(rr - r) ** 2 + (cc - c) ** 2 <= 12**2] = (40, 20, 90)
    for r, c in NOT_MITOTIC:
        img[(rr - r) ** 2 / 81 + (cc - c) ** 2 / 36 <= 1] = (150, 110, 190)
    return img


@pytest.fixture
def panel(viewer) -> MitosisWidget:
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Mitosis classifier")
    return widget


def click(points, pts, panel: MitosisWidget, label: str) -> None:
    """Choose the class in the panel, then add the points as clicks in add mode would."""
    panel.class_combo.setCurrentText(label)
    for p in pts:
        points.add(np.asarray([p], float))


def test_adapt_from_clicks_saves_a_model_and_hands_it_to_adapt(viewer, panel, qtbot, _sessions_in_tmp):
    img = blobs()
    viewer.add_image(img, name="blobs", rgb=True, metadata={"mpp": 0.25})
    _, adapt = viewer.window.add_plugin_dock_widget(PLUGIN, "Adapt & predict")
    points = panel.create_points()
    assert points.mode == "add" and unwrap(panel.points_combo.layer()) is unwrap(points)
    click(points, MITOTIC, panel, "mitotic (1)")
    click(points, NOT_MITOTIC, panel, "not mitotic (0)")
    assert points.features["class"].tolist() == [1] * 4 + [0] * 4
    assert np.allclose(points.face_color[[0, -1]], [transform_color(COLOURS[1])[0], transform_color(COLOURS[0])[0]])
    panel.steps.setValue(100)
    panel.start()
    assert panel.runner.busy and not panel.adapt_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60000)
    assert panel.status.text() == "Mitosis adaptation: done", panel.status.text()
    path = panel.model_path
    assert path and path.startswith(str(_sessions_in_tmp / "mitosis" / "blobs-")) and path.endswith(".safetensors")
    model, desc = load_mitosis_model(path)
    assert desc["adapted_from"]["n_mitotic"] == 4 and desc["adapted_from"]["image"] == "blobs"
    patches, _ = extract_patches(img, np.array(MITOTIC + NOT_MITOTIC, float), 0.25, model.cfg)
    prob = classify(model, patches)
    assert (prob[:4] > 0.5).all() and (prob[4:] < 0.5).all()
    assert adapt.settings.mitosis_edit.text() == path and "set as the mitosis model" in panel.result.text()


def test_selected_points_switch_class(viewer, panel):
    viewer.add_image(blobs(), name="blobs", rgb=True, metadata={"mpp": 0.25})
    points = panel.create_points()
    click(points, MITOTIC[:2], panel, "mitotic (1)")
    panel.class_combo.setCurrentText("not mitotic (0)")  # add mode: the last click stays selected and mitotic
    assert points.features["class"].tolist() == [1, 1]
    points.mode = "select"
    points.selected_data = {0}
    panel.class_combo.setCurrentText("mitotic (1)")
    panel.class_combo.setCurrentText("not mitotic (0)")
    assert points.features["class"].tolist() == [0, 1]
    assert np.allclose(points.face_color, [transform_color(COLOURS[0])[0], transform_color(COLOURS[1])[0]])


@pytest.mark.parametrize(("labels", "message"), [
    ([1, 1], "at least one mitotic (1) and one non-mitotic (0) point; got 2 mitotic and 0 non-mitotic"),
    (None, "has no 'class' feature"),
])
def test_bad_examples_give_one_clear_error(viewer, panel, errors, labels, message):
    viewer.add_image(blobs(), name="blobs", rgb=True)
    features = {"class": np.asarray(labels)} if labels is not None else {}
    viewer.add_points(np.array([[60.0, 60.0], [200.0, 200.0]]), features=features, name="clicks")
    panel.points_combo.setCurrentText("clicks")
    assert panel.start() is None and not panel.runner.busy
    assert len(errors) == 1 and message in errors[0] and "'clicks'" in errors[0], errors


def test_cancel_saves_nothing(viewer, panel, qtbot, _sessions_in_tmp):
    viewer.add_image(blobs(), name="blobs", rgb=True, metadata={"mpp": 0.25})
    points = panel.create_points()
    click(points, MITOTIC[:1], panel, "mitotic (1)")
    click(points, NOT_MITOTIC[:1], panel, "not mitotic (0)")
    panel.steps.setValue(100000)  # minutes of steps: only Cancel ends it
    panel.start()
    qtbot.waitUntil(lambda: panel.status.text().startswith("adapting"), timeout=60000)
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: not panel.runner.busy, timeout=60000)
    assert panel.status.text() == "Mitosis adaptation: cancelled" and panel.model_path is None
    assert not (_sessions_in_tmp / "mitosis").exists() and panel.adapt_button.isEnabled()
