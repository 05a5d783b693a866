"""Evaluate: held-out metrics of the current prediction against truth layers — mIoU, Dice and pixel accuracy
(truth == 255 or an unpainted support pixel is skipped; by default also the pixels painted in the support strokes
and circles of the prediction's image, which the head was adapted on), AJI and PQ for instances (nuclei or
gland/object instances), detection F1 for points.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import napari
import numpy as np
from qtpy.QtWidgets import QCheckBox, QFormLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..config import PointsConfig
from ..maml import run
from ..metrics import detection_scores, score_strips
from .common import LayerCombo, row
from .layers import kind_of, layer_to_support, level0, plugin_meta, support_origin
from .workers import JobRunner

NOT_TRUTH = ("prediction", "instances", "objects", "preview", "circles")


DISPLAY = {"miou": "mIoU", "dice": "Dice", "accuracy": "accuracy", "aji": "AJI", "pq": "PQ", "dq": "DQ", "sq": "SQ"}
STRIP_ROWS = 2048  # rows of the layers read at a time (a slide-sized layer is never read whole)


INLINE_MAX_MP = 4.0  # in-memory layers up to this size are scored at once on the GUI thread (4 MP: ~0.2 s on 2 cores)


def is_lazy(layer: Any) -> bool:
    """Whether a layer's data are read on demand (zarr, dask, a streamed prediction, multiscale) or too large to be
    scored on the GUI thread (above :data:`INLINE_MAX_MP`): such layers are scored on a worker."""
    data = level0(layer)
    return not isinstance(data, np.ndarray) or data.shape[0] * data.shape[1] > INLINE_MAX_MP * 1e6


class PaintedPixels:
    """The pixels painted in support layers, as an ``(H, W)`` array-like over the whole image that
    :func:`.metrics.score_strips` reads in row strips (``a[r0:r1]`` → bool; nonzero = painted). ``parts`` are
    ``(layer data, (row, col) origin in the image)``: a support layer may cover a region of a slide."""

    def __init__(self, shape: tuple[int, int], parts: list[tuple[Any, tuple[int, int]]]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.parts = [(np.asarray(data), (int(r), int(c))) for data, (r, c) in parts]

    def count(self) -> int:
        """Painted pixels inside the image (overlapping layers counted once)."""
        return int(sum(np.count_nonzero(self[r:r + 4096]) for r in range(0, self.shape[0], 4096)))

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("PaintedPixels reads row strips only: a[r0:r1]")
        r0, r1, _ = key.indices(self.shape[0])
        out = np.zeros((max(r1 - r0, 0), self.shape[1]), bool)
        for data, (pr, pc) in self.parts:
            a, b = max(r0, pr), min(r1, pr + data.shape[0])
            c0, c1 = max(0, pc), min(self.shape[1], pc + data.shape[1])
            if a < b and c0 < c1:
                out[a - r0:b - r0, c0:c1] |= data[a - pr:b - pr, c0 - pc:c1 - pc] != 0
        return out


def support_pixels(viewer: napari.Viewer, pred: Any) -> PaintedPixels | None:
    """The support strokes and centroid circles made for the prediction's image (None if there are none)."""
    image = plugin_meta(pred).get("image")
    parts = [(level0(ly), support_origin(ly)) for ly in viewer.layers
             if kind_of(ly) in ("support", "circles") and plugin_meta(ly).get("image") == image]
    return PaintedPixels(level0(pred).shape[:2], parts) if parts else None


def score_job(pred: Any, truth: Any, pred_inst: Any = None, truth_inst: Any = None,
              truth_points: Any = None, match_radius_px: float | None = None,
              exclude: Any = None, pred_points: Any = None) -> Generator[dict, None, dict]:
    """Metrics of the given layers (any may be None except ``pred``), read in row strips; yields progress and
    returns ``{display name: value}``. ``exclude`` (e.g. :class:`PaintedPixels`): pixels left out of the class
    scores. Detection scores compare ``truth_points`` with ``pred_points`` (a Points layer of detected cells), else
    with the centroids of ``pred_inst``. ValueError on mismatched inputs."""
    semantic = pred is not None and truth is not None
    n = max(len(plugin_meta(pred).get("classes") or []), 1) if pred is not None else 1
    convert = (lambda t: layer_to_support(t)) if semantic and kind_of(truth) == "support" else None
    instances = pred_inst is not None and truth_inst is not None
    pred_classes = level0(pred) if semantic else None
    if convert is not None and support_origin(truth) != (0, 0):  # a support region of a slide: its part only
        (r0, c0), (h, w) = support_origin(truth), level0(truth).shape
        pred_classes = pred_classes[r0:r0 + h, c0:c0 + w]
    scores = yield from score_strips(pred_classes, level0(truth) if semantic else None,
                                     level0(pred_inst) if instances else None,
                                     level0(truth_inst) if instances else None,
                                     n_classes=n, truth_to_classes=convert, strip_rows=STRIP_ROWS,
                                     exclude=exclude if semantic and convert is None else None)
    out = {DISPLAY[k]: v for k, v in scores.items()}
    if truth_points is not None and (pred_points is not None or pred_inst is not None):
        if pred_points is not None:  # detected cells (a head adapted on clicked centroids)
            pts = np.asarray(pred_points.data, float).reshape(-1, 2)
        else:  # the predicted instances' centroids
            feats = pred_inst.features
            pts = (np.c_[feats["centroid_row"], feats["centroid_col"]] if "centroid_row" in feats
                   else np.zeros((0, 2)))
        radius = match_radius_px if match_radius_px is not None else PointsConfig().match_radius_px
        det = detection_scores(pts, np.asarray(truth_points.data).reshape(-1, 2), radius)
        out.update(precision=det["precision"], recall=det["recall"], F1=det["f1"])
    return out


def evaluate_layers(pred: Any, truth: Any, pred_inst: Any = None, truth_inst: Any = None,
                    truth_points: Any = None, match_radius_px: float | None = None,
                    exclude: Any = None, pred_points: Any = None) -> dict[str, float]:
    """:func:`score_job` run to its end on this thread."""
    return run(score_job(pred, truth, pred_inst, truth_inst, truth_points, match_radius_px, exclude, pred_points))


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
        self.points_combo = LayerCombo(v, napari.layers.Points, exclude_kinds=("mitosis", "points", "cells"),
                                       optional=True)
        self.hold_out = QCheckBox("leave out the support strokes", checked=True,
                                  toolTip="score classes only where the head was not adapted: the pixels painted in "
                                          "the support and circles layers of the prediction's image are skipped")
        self._note = ""
        self._prefer_truth()
        v.layers.events.inserted.connect(self._prefer_truth)
        self.button = QPushButton("Evaluate")
        self.button.clicked.connect(lambda: self.evaluate())
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.bar, self.status = QProgressBar(), QLabel("")
        self.runner = JobRunner(self.bar, self.status, self)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.runner.started.connect(lambda: self._busy(True))
        self.runner.stopped.connect(lambda _: self._busy(False))
        self.table = QLabel("Choose a prediction and a truth layer, then press Evaluate.")
        self.table.setWordWrap(True)
        self.results: dict[str, float] = {}
        form = QFormLayout()
        for label, w in [("prediction", self.pred_combo), ("truth classes", self.truth_combo),
                         ("predicted instances", self.pred_inst_combo), ("truth instances", self.truth_inst_combo),
                         ("truth points", self.points_combo)]:
            form.addRow(label, w)
        form.addRow("", self.hold_out)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        for w in (row(self.button, self.cancel_button), self.bar, self.status, self.table):
            lay.addWidget(w)
        lay.addStretch()

    def _prefer_truth(self, *_: Any) -> None:
        """Pre-select layers marked as truth by the sample data when nothing else was chosen."""
        for combo, kind in ((self.truth_combo, "truth"), (self.truth_inst_combo, "truth_instances")):
            marked = [ly for ly in self.viewer.layers if kind_of(ly) == kind]
            if marked and kind_of(combo.layer()) != kind:
                combo.set_layer(marked[-1])
        if self.pred_inst_combo.layer() is None and len(self.pred_inst_combo.candidates()):
            self.pred_inst_combo.set_layer(self.pred_inst_combo.candidates()[-1])

    def _busy(self, busy: bool) -> None:
        self.button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def evaluate(self) -> dict[str, float]:
        """Compute and show the metrics (an error notification if the layers do not fit). In-memory layers are
        scored at once and the metrics returned; lazy or slide-sized ones (a streamed prediction) are scored strip
        by strip on a worker thread with progress and Cancel — this returns {} and the table fills in when done."""
        return self.runner.guarded("Evaluate", self._start) or {}

    def _start(self) -> dict[str, float] | None:
        layers = (self.pred_combo.layer(), self.truth_combo.layer(), self.pred_inst_combo.layer(),
                  self.truth_inst_combo.layer(), self.points_combo.layer())
        if layers[0] is None:
            raise ValueError("no prediction layer: press Adapt & predict first")
        if layers[1] is None and (layers[3] is None or layers[2] is None) and layers[4] is None:
            raise ValueError("nothing to compare: choose a truth layer (classes, nuclei or points)")
        exclude, self._note = None, ""
        if layers[1] is not None and kind_of(layers[1]) not in ("support", "circles"):
            strokes = support_pixels(self.viewer, layers[0])
            painted = strokes.count() if strokes is not None else 0
            exclude = strokes if painted and self.hold_out.isChecked() else None
            if exclude is not None:
                self._note = (f"<br><i>held-out: the {painted} pixels painted in the support strokes are left out "
                              "of the class scores (instance and point scores count everything)</i>")
            elif painted:
                self._note = (f"<br><i>every pixel is scored, the {painted} painted in the support strokes too: "
                              "not held-out</i>")
        image = plugin_meta(layers[0]).get("image")
        cells = [ly for ly in self.viewer.layers if kind_of(ly) == "cells" and plugin_meta(ly).get("image") == image]
        found = {"exclude": exclude, "pred_points": cells[-1] if cells else None}
        if any(ly is not None and is_lazy(ly) for ly in layers[:4]):
            self.runner.run("Evaluate", score_job, *layers, **found, on_return=self._show)
            return None
        return self._show(evaluate_layers(*layers, **found))

    def _show(self, results: dict[str, float]) -> dict[str, float]:
        self.results = results
        if not results:
            raise ValueError("nothing to compare: choose a truth layer (classes, nuclei or points)")
        rows = "".join(f"<tr><td>{k}</td><td align='right'>{v:.3f}</td></tr>" for k, v in results.items())
        note = ("<br><i>truth = the support strokes the head was adapted on: not held-out</i>"
                if kind_of(self.truth_combo.layer()) in ("support", "circles") else self._note)
        self.table.setText(f"<table>{rows}</table>{note}")
        return results
