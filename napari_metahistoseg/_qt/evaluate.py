"""Evaluate: held-out metrics of the current prediction against truth layers — mIoU, Dice and pixel accuracy
(truth == 255 or an unpainted support pixel is skipped), AJI and PQ for instances (nuclei or gland/object
instances), detection F1 for points.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QFormLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..config import PointsConfig
from ..metrics import ConfusionAccumulator, aji, detection_scores, panoptic_quality
from .common import LayerCombo
from .layers import kind_of, layer_to_support, plugin_meta
from .workers import error_text

NOT_TRUTH = ("prediction", "instances", "objects", "preview", "circles")


def truth_classes(layer: Any) -> np.ndarray:
    """Class ids of a truth Labels layer (a support layer is converted: its 0 means unknown)."""
    return layer_to_support(layer.data) if kind_of(layer) == "support" else np.asarray(layer.data)


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction {a.shape} and truth {b.shape} differ in size")


def evaluate_layers(pred: Any, truth: Any, pred_inst: Any = None, truth_inst: Any = None,
                    truth_points: Any = None, match_radius_px: float | None = None) -> dict[str, float]:
    """Metrics of the given layers (any may be None except ``pred``); ValueError on mismatched inputs."""
    out: dict[str, float] = {}
    if pred is not None and truth is not None:
        p, t = np.asarray(pred.data), truth_classes(truth)
        _same_shape(p, t, "classes")
        labelled = t[t != 255]
        n = max(len(plugin_meta(pred).get("classes") or []), int(p.max()) + 1,
                int(labelled.max()) + 1 if labelled.size else 1)
        acc = ConfusionAccumulator(n)
        acc.update(p.astype(np.int64), t.astype(np.int64))
        out.update(mIoU=acc.miou(), Dice=acc.dice_foreground(), accuracy=acc.pixel_accuracy())
    if pred_inst is not None and truth_inst is not None:
        p, t = np.asarray(pred_inst.data), np.asarray(truth_inst.data)
        _same_shape(p, t, "nuclei")
        pq = panoptic_quality(t, p)
        out.update(AJI=aji(t, p), PQ=pq["pq"], DQ=pq["dq"], SQ=pq["sq"])
    if pred_inst is not None and truth_points is not None:
        feats = pred_inst.features
        pts = (np.c_[feats["centroid_row"], feats["centroid_col"]] if "centroid_row" in feats
               else np.zeros((0, 2)))
        radius = match_radius_px if match_radius_px is not None else PointsConfig().match_radius_px
        det = detection_scores(pts, np.asarray(truth_points.data).reshape(-1, 2), radius)
        out.update(precision=det["precision"], recall=det["recall"], F1=det["f1"])
    return out


class EvaluateWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        v = self.viewer = napari_viewer
        self.pred_combo = LayerCombo(v, napari.layers.Labels, kinds=("prediction",))
        self.truth_combo = LayerCombo(v, napari.layers.Labels, exclude_kinds=NOT_TRUTH + ("truth_instances",),
                                      optional=True)
        self.pred_inst_combo = LayerCombo(v, napari.layers.Labels, kinds=("instances", "objects"), optional=True)
        self.truth_inst_combo = LayerCombo(v, napari.layers.Labels, exclude_kinds=NOT_TRUTH + ("support", "truth"),
                                           optional=True)
        self.points_combo = LayerCombo(v, napari.layers.Points, exclude_kinds=("mitosis", "points"), optional=True)
        self._prefer_truth()
        v.layers.events.inserted.connect(self._prefer_truth)
        button = QPushButton("Evaluate")
        button.clicked.connect(lambda: self.evaluate())
        self.table = QLabel("Choose a prediction and a truth layer, then press Evaluate.")
        self.table.setWordWrap(True)
        self.results: dict[str, float] = {}
        form = QFormLayout()
        for label, w in [("prediction", self.pred_combo), ("truth classes", self.truth_combo),
                         ("predicted instances", self.pred_inst_combo), ("truth instances", self.truth_inst_combo),
                         ("truth points", self.points_combo)]:
            form.addRow(label, w)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(button)
        lay.addWidget(self.table)
        lay.addStretch()

    def _prefer_truth(self, *_: Any) -> None:
        """Pre-select layers marked as truth by the sample data when nothing else was chosen."""
        for combo, kind in ((self.truth_combo, "truth"), (self.truth_inst_combo, "truth_instances")):
            marked = [ly for ly in self.viewer.layers if kind_of(ly) == kind]
            if marked and kind_of(combo.layer()) != kind:
                combo.set_layer(marked[-1])
        if self.pred_inst_combo.layer() is None and len(self.pred_inst_combo.candidates()):
            self.pred_inst_combo.set_layer(self.pred_inst_combo.candidates()[-1])

    def evaluate(self) -> dict[str, float]:
        """Compute and show the metrics (an error notification if the layers do not fit)."""
        try:
            if self.pred_combo.layer() is None:
                raise ValueError("no prediction layer: press Adapt & predict first")
            self.results = evaluate_layers(self.pred_combo.layer(), self.truth_combo.layer(),
                                           self.pred_inst_combo.layer(), self.truth_inst_combo.layer(),
                                           self.points_combo.layer())
            if not self.results:
                raise ValueError("nothing to compare: choose a truth layer (classes, nuclei or points)")
        except ValueError as e:
            show_error(error_text("Evaluate", e))
            return {}
        rows = "".join(f"<tr><td>{k}</td><td align='right'>{v:.3f}</td></tr>" for k, v in self.results.items())
        note = ("<br><i>truth = the support strokes the head was adapted on: not held-out</i>"
                if kind_of(self.truth_combo.layer()) == "support" else "")
        self.table.setText(f"<table>{rows}</table>{note}")
        return self.results
