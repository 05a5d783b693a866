"""Evaluate widget: mIoU/Dice against a truth layer, AJI/PQ against truth nuclei, F1 against truth points."""

from __future__ import annotations

import numpy as np
import pytest

from napari_metahistoseg.sample_data import META

from ._helpers import PLUGIN


@pytest.fixture
def evaluate(viewer):
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Evaluate")
    return widget


def _truth(viewer):
    sem = np.zeros((32, 32), np.uint8)
    sem[8:16, 8:16] = 1
    inst = (sem > 0).astype(np.uint32)
    viewer.add_labels(sem, name="truth", metadata={META: {"kind": "truth"}})
    viewer.add_labels(inst, name="truth nuclei", metadata={META: {"kind": "truth_instances"}})
    viewer.add_points([[11.5, 11.5]], name="truth points")
    return sem, inst


def test_perfect_prediction_scores_one(viewer, evaluate):
    sem, inst = _truth(viewer)
    viewer.add_labels(sem.copy(), name="pred", metadata={META: {"kind": "prediction", "classes": ["b", "n"]}})
    viewer.add_labels(inst.copy(), name="pred nuclei", metadata={META: {"kind": "instances"}},
                      features={"index": [1], "centroid_row": [11.5], "centroid_col": [11.5]})
    evaluate.points_combo.set_layer(viewer.layers["truth points"])
    res = evaluate.evaluate()
    assert res["mIoU"] == 1.0 and res["Dice"] == 1.0 and res["AJI"] == 1.0 and res["PQ"] == 1.0
    assert res["F1"] == 1.0 and "mIoU" in evaluate.table.text()


def test_partial_prediction_and_support_as_truth(viewer, evaluate):
    sem, _ = _truth(viewer)
    pred = np.zeros_like(sem)
    pred[8:16, 8:12] = 1
    viewer.add_labels(pred, name="pred", metadata={META: {"kind": "prediction"}})
    res = evaluate.evaluate()
    assert res["Dice"] == pytest.approx(2 * 32 / (64 + 32)) and "AJI" not in res
    support = np.zeros_like(sem)
    support[8:16, 8:12] = 2  # nucleus where it was predicted; the rest unknown → skipped
    viewer.add_labels(support, name="support", metadata={META: {"kind": "support"}})
    evaluate.truth_combo.set_layer(viewer.layers["support"])
    assert evaluate.evaluate()["mIoU"] == 1.0 and "not held-out" in evaluate.table.text()


def test_errors(viewer, evaluate, errors):
    assert evaluate.evaluate() == {} and "no prediction layer" in errors[-1]
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="p0", metadata={META: {"kind": "prediction"}})
    assert evaluate.truth_combo.layer() is None  # nothing marked as truth: no silent default
    assert evaluate.evaluate() == {} and "nothing to compare" in errors[-1]
    viewer.layers.clear()
    _truth(viewer)
    viewer.add_labels(np.zeros((8, 8), np.uint8), name="pred", metadata={META: {"kind": "prediction"}})
    assert evaluate.evaluate() == {} and "differ in size" in errors[-1]


def test_lazy_layers_are_scored_in_strips_on_a_worker(viewer, evaluate, qtbot, tmp_path, monkeypatch):
    """A streamed (zarr-backed) prediction is never read whole: scored strip by strip in a worker thread."""
    import zarr

    from napari_metahistoseg._qt import evaluate as ev

    monkeypatch.setattr(ev, "STRIP_ROWS", 16)
    sem, inst = _truth(viewer)
    root = zarr.open_group(str(tmp_path / "pred.zarr"), mode="w")
    root.create_array("semantic", shape=sem.shape, chunks=(16, 32), dtype="uint8")[:] = sem
    root.create_array("instances", shape=inst.shape, chunks=(16, 32), dtype="uint32")[:] = inst
    reads = []
    real = ev.score_strips

    def spy(*arrays, **kw):
        reads.extend(type(a).__name__ for a in arrays if a is not None)
        return (yield from real(*arrays, **kw))

    monkeypatch.setattr(ev, "score_strips", spy)
    viewer.add_labels([root["semantic"], sem[::2, ::2]], name="pred",  # multiscale: level 0 is scored
                      metadata={META: {"kind": "prediction", "classes": ["b", "n"]}})
    viewer.add_labels(root["instances"], name="pred nuclei", metadata={META: {"kind": "instances"}})
    evaluate.pred_inst_combo.set_layer(viewer.layers["pred nuclei"])
    assert evaluate.evaluate() == {}  # started on a worker thread
    assert evaluate.runner.busy and not evaluate.button.isEnabled()
    qtbot.waitUntil(lambda: not evaluate.runner.busy, timeout=20000)
    assert reads.count("Array") == 2  # the zarr arrays (level 0) went to the strip scorer as they are
    assert evaluate.results["mIoU"] == 1.0 and evaluate.results["AJI"] == 1.0 and evaluate.results["PQ"] == 1.0
    assert "mIoU" in evaluate.table.text() and evaluate.button.isEnabled()
    assert evaluate.status.text() == "Evaluate: done"


def test_support_strokes_are_held_out_of_the_class_scores(viewer, evaluate):
    sem, _ = _truth(viewer)
    pred = sem.copy()
    pred[20:24, 0:32] = 1  # wrong only in rows 20-23, where the user painted (and the head was adapted)
    viewer.add_labels(pred, name="pred", metadata={META: {"kind": "prediction", "image": "img"}})
    strokes = np.zeros((8, 40), np.uint8)  # a support region of the image at (18, 0), wider than the image
    strokes[2:6] = 1
    viewer.add_labels(strokes, name="support", metadata={META: {"kind": "support", "image": "img",
                                                                 "origin": [18, 0]}})
    other = np.ones((32, 32), np.uint8)  # strokes on another image: not this prediction's
    viewer.add_labels(other, name="other support", metadata={META: {"kind": "support", "image": "another"}})
    evaluate.truth_combo.set_layer(viewer.layers["truth"])
    res = evaluate.evaluate()
    assert res["mIoU"] == 1.0 and "128 pixels painted" in evaluate.table.text()
    evaluate.hold_out.setChecked(False)
    assert evaluate.evaluate()["mIoU"] < 0.9 and "not held-out" in evaluate.table.text()


def test_large_in_memory_layers_are_scored_on_a_worker(viewer, evaluate, qtbot, monkeypatch):
    from napari_metahistoseg._qt import evaluate as ev

    monkeypatch.setattr(ev, "INLINE_MAX_MP", 0.0005)  # the 32 x 32 layers (0.001 MP) count as large
    sem, _ = _truth(viewer)
    viewer.add_labels(sem.copy(), name="pred", metadata={META: {"kind": "prediction", "classes": ["b", "n"]}})
    assert evaluate.evaluate() == {} and evaluate.runner.busy  # not on the GUI thread
    qtbot.waitUntil(lambda: not evaluate.runner.busy, timeout=20000)
    assert evaluate.results["mIoU"] == 1.0
