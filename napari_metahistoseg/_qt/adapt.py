"""Adapt & predict: adapt a head on the support strokes, then predict classes, nuclei and mitosis candidates.

Everything long runs in a generator ``thread_worker`` (:mod:`.workers`): progress bar, ETA, live loss curve,
Cancel. The visible field is predicted first (a temporary preview layer), then the full image; a cancelled or
failed run removes the preview and adds nothing. "Live" re-adapts 1 s after the last stroke.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import napari
from napari.utils.notifications import show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFormLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ..inference import click_radius_px
from ..sample_data import class_colours
from . import display, jobs
from .adapt_settings import AdaptSettings
from .common import LayerCombo, row, unwrap
from .layers import find_layers, image_mpp, image_source, merged_support, plugin_meta, support_origin
from .plot import LossCurve
from .state import state_for
from .workers import JobRunner

LIVE_DELAY_MS = 1000  # live mode: re-adapt this long after the last stroke


class AdaptWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self._preview: Any = None
        self._live_layers: list[Any] = []
        self._live_pending = False
        self._mpp_warned: set[str] = set()  # images whose unknown µm/px was already reported
        self._clicked: tuple[float | None, float | None] = (None, None)  # click radius (px) and image mpp of a run
        self.last_created: list[Any] = []  # layers added by the last finished run
        self._build()
        self.state.backbone_changed.connect(self._sync_backbone)
        self.state.head_changed.connect(self._sync_head)
        self._sync_head(self.state.head)

    # ------------------------------------------------------------------------------------------ UI

    def _build(self) -> None:
        v = self.viewer
        self.image_combo = LayerCombo(v, napari.layers.Image)
        self.support_combo = LayerCombo(v, napari.layers.Labels, kinds=("support",))
        self.settings = s = AdaptSettings(self.state.backbone_spec)
        s.backbone_edit.editingFinished.connect(self._set_backbone)
        s.live.toggled.connect(self._watch_live)
        self.support_combo.currentIndexChanged.connect(lambda *_: self._watch_live(s.live.isChecked()))
        v.layers.events.inserted.connect(lambda *_: self._watch_live(s.live.isChecked()))  # a new support region
        s.threshold.valueChanged.connect(self._apply_threshold)
        self.adapt_button = QPushButton("Adapt && predict")
        self.adapt_button.clicked.connect(lambda: self.run_adapt())
        self.predict_button = QPushButton("Predict")
        self.predict_button.clicked.connect(lambda: self.run_predict())
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.bar, self.status, self.curve, self.head_label = QProgressBar(), QLabel("idle"), LossCurve(), QLabel()
        self.status.setWordWrap(True)
        self.runner = JobRunner(self.bar, self.status, self)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.runner.started.connect(lambda: self._busy(True))
        self.runner.stopped.connect(lambda *_: self._busy(False))
        self._live_timer = QTimer(self, singleShot=True, interval=LIVE_DELAY_MS)
        self._live_timer.timeout.connect(self._live_fire)
        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("support", self.support_combo)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        for w in (s, row(self.adapt_button, self.predict_button, self.cancel_button), self.bar, self.status,
                  self.curve, self.head_label):
            lay.addWidget(w)
        lay.addStretch()

    def _busy(self, busy: bool) -> None:
        self.adapt_button.setEnabled(not busy)
        self.predict_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _set_backbone(self) -> None:
        self.state.backbone_spec = self.settings.backbone_edit.text()

    def _sync_backbone(self, spec: str) -> None:
        self.settings.backbone_edit.setText(spec)

    def _sync_head(self, head: Any) -> None:
        if head is None:
            self.head_label.setText("no head yet")
            return
        text = f"head: {', '.join(head.classes)} ({self.state.head_source})"
        if getattr(head, "threshold", None) is not None:  # what the calibration decided, so the user can see it
            text += f" · threshold {head.threshold:.2f}"
        if getattr(head, "smoothing_um", 0.0):
            text += f" · smoothing {head.smoothing_um:g} µm"
        if getattr(head, "colour_sigmas_um", ()):
            text += " · colour"
        self.head_label.setText(text)

    def _image(self) -> Any:
        layer = self.image_combo.layer()
        if layer is None:
            raise ValueError("no image layer: open an image first")
        return layer

    # ------------------------------------------------------------------------------------------ runs

    def run_adapt(self, predict: bool = True, live: bool = False) -> Any:
        """Adapt a head on the selected support (then predict); returns the worker (None if refused). ``live``
        (a re-adaptation after a stroke): a slide-sized image is predicted in the visible field only."""
        return self.runner.guarded("Adapt", lambda: self._start_adapt(predict, live))

    def _start_adapt(self, predict: bool, live: bool = False) -> Any:
        self._set_backbone()
        image_layer, support_layer = self._image(), self.support_combo.layer()
        if support_layer is None:
            raise ValueError("no support layer: create one in the Annotate widget and paint some strokes")
        meta = plugin_meta(support_layer)
        image = image_source(image_layer)  # a large image is never read whole (the jobs cut or stream it)
        classes = list(meta.get("classes") or [])
        # the support regions of a slide (layers with an origin) of this image and these classes adapt together
        regions = [(self._merged(ly), support_origin(ly)) for ly in self._support_layers(support_layer)]
        for sup, (r0, c0) in regions:
            if "origin" not in meta and sup.shape != tuple(image.shape[:2]):  # not a region: the image's own
                raise ValueError(f"support {sup.shape} and image {tuple(image.shape[:2])} differ in size")
            if r0 + sup.shape[0] > image.shape[0] or c0 + sup.shape[1] > image.shape[1]:
                raise ValueError(f"support {sup.shape} at {(r0, c0)} does not fit the image {image.shape[:2]}")
        (support, origin), more = regions[0], regions[1:]
        colours = list(meta.get("colours") or class_colours(len(classes)))
        head = self.state.head
        init = head if self.settings.start_from_current() else None
        then = self.settings.predict_settings(image_layer) if predict else None
        if then is not None and live:
            then = dataclasses.replace(then, roi_only=True)
        clicked = self._click_radius(support_layer)  # adapted on clicked centroids: the cells are detected too
        if then is not None and clicked:
            then = dataclasses.replace(then, cells_radius_px=clicked)
        self._clicked = (clicked, image_mpp(image_layer))
        self.curve.clear()
        self._colours = colours
        return self.runner.run("Adapt", jobs.adapt_job, self.state.backbone, image, support, classes, colours,
                               self.settings.maml_config(), self.settings.devices(), init, image_mpp(image_layer), then,
                               origin, more, on_yield=lambda p: self._progress(p, image_layer),
                               on_return=lambda r: self._show(r, image_layer), on_stop=self._stopped)

    def _support_layers(self, support_layer: Any) -> list[Any]:
        """``support_layer`` and, for a support region of a slide, the other regions of that image with the same
        classes (they adapt together)."""
        meta = plugin_meta(support_layer)
        if "origin" not in meta:
            return [support_layer]

        def same_task(ly: Any) -> bool:
            m = plugin_meta(ly)
            return "origin" in m and m.get("image") == meta.get("image") and m.get("classes") == meta.get("classes")

        return [support_layer] + [ly for ly in find_layers(self.viewer, "support")
                                  if unwrap(ly) is not unwrap(support_layer) and same_task(ly)]

    def _click_radius(self, support_layer: Any) -> float | None:
        """The radius (image px) of the centroid circles of ``support_layer``'s group when it has clicked points."""
        group = plugin_meta(support_layer).get("group")
        circles = find_layers(self.viewer, "circles", group=group) if group else []
        points = find_layers(self.viewer, "points", group=group) if group else []
        radius = plugin_meta(circles[0]).get("radius_px") if circles else None
        return float(radius) if radius and points and len(points[0].data) else None

    def _merged(self, support_layer: Any) -> Any:
        """The support of a support layer with the circles of its centroid clicks filled in."""
        group = plugin_meta(support_layer).get("group")
        circles = find_layers(self.viewer, "circles", group=group) if group else []
        return merged_support(support_layer, circles[0] if circles else None)

    def run_predict(self) -> Any:
        """Predict with the current head; returns the worker (None if refused)."""
        return self.runner.guarded("Predict", self._start_predict)

    def _start_predict(self) -> Any:
        self._set_backbone()
        head = self.state.head
        if head is None:
            raise ValueError("no adapted head: press Adapt or import a head")
        image_layer = self._image()
        self._colours = list(head.colours or class_colours(len(head.classes)))
        settings = self.settings.predict_settings(image_layer)
        settings = dataclasses.replace(settings, cells_radius_px=click_radius_px(head, image_mpp(image_layer)
                                                                                 or head.mpp))
        return self.runner.run("Predict", jobs.predict_job, self.state.backbone, head, image_source(image_layer),
                               settings,
                               on_yield=lambda p: self._progress(p, image_layer),
                               on_return=lambda r: self._show(r, image_layer), on_stop=self._stopped)

    def _progress(self, p: dict, image_layer: Any) -> None:
        stage = p.get("stage")
        if p.get("mpp_assumed") is not None and image_layer.name not in self._mpp_warned:
            # never silent (once per image, not on every live re-adaptation): a 40x slide taken at 0.5 µm/px is
            # wrongly scaled
            self._mpp_warned.add(image_layer.name)
            show_warning(f"{image_layer.name}: µm per pixel unknown — assuming {p['mpp_assumed']:g} µm/px (the "
                         "backbone's); set it in Annotate support")
        if stage == "adapt" and p.get("loss") is not None:
            self.curve.add(p["loss"])
        elif stage == "adapted":
            radius, mpp = self._clicked
            if radius:  # recorded like `metahistoseg adapt --points` does, in the backbone's pixels
                p["head"].provenance.update(support_kind="points",
                                            points_radius_model_px=radius * (mpp or p["head"].mpp) / p["head"].mpp)
            self.state.set_head(p["head"], "adapted")
            self.state.autosaver.save_head(p["head"], image_layer)
        elif stage == "preview":
            self._drop_preview()
            self._preview = display.show_preview(self.viewer, image_layer, p["prediction"], p["region"],
                                                 self._colours)

    def _show(self, result: Any, image_layer: Any) -> None:
        self.last_created = display.show_result(self.viewer, image_layer, result, self._colours) if result else []
        if result is not None and result.mitosis_points is not None:
            self._apply_threshold(self.settings.threshold.value())

    def _drop_preview(self) -> None:
        if self._preview is not None and self._preview in self.viewer.layers:
            self.viewer.layers.remove(self._preview)
        self._preview = None

    def _stopped(self, outcome: str) -> None:
        self._drop_preview()
        if self._live_pending and outcome != "aborted":
            self._live_pending = False
            self._live_timer.start()

    def _apply_threshold(self, value: int) -> None:
        for ly in find_layers(self.viewer, "mitosis"):
            display.apply_threshold(ly, value / 100)

    # ------------------------------------------------------------------------------------------ live mode

    def _watch_live(self, on: bool) -> None:
        """Re-adapt after strokes in the chosen support layer and, on a slide, in its sibling regions."""
        for layer in self._live_layers:
            for ev in (layer.events.paint, layer.events.data):
                ev.disconnect(self._on_stroke)
        layer = self.support_combo.layer()
        self._live_layers = self._support_layers(layer) if on and layer is not None else []
        for layer in self._live_layers:
            for ev in (layer.events.paint, layer.events.data):
                ev.connect(self._on_stroke)

    def _on_stroke(self, event: Any = None) -> None:
        self._live_timer.start()

    def _live_fire(self) -> None:
        if self.runner.busy:
            self._live_pending = True
        elif self.settings.live.isChecked():
            self.run_adapt(live=True)
