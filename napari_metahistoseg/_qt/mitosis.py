"""Mitosis classifier: adapt the mitosis classifier to examples clicked on an image.

A *mitosis examples* Points layer holds the clicks with a ``class`` feature (1 = mitotic, 0 = not mitotic). The
panel chooses the class of the next clicks; in select mode, choosing it also relabels the selected points.
*Adapt* runs :func:`napari_metahistoseg.mitosis.adapt_from_points` on a worker thread (progress, Cancel), saves
the model (safetensors + JSON) to the *save as* path, or by default to ``<sessions folder>/mitosis/<image>-<time>``,
and puts its path into the mitosis model field of this viewer's Adapt & predict panel when it is docked.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_info, show_warning
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..config import MitosisConfig
from ..devices import available_devices
from ..mitosis import adapt_from_points, save_mitosis_model
from ..mitosis_eval import DEFAULT_PATCH_MPP
from ..slide import open_array
from .adapt_settings import AdaptSettings
from .common import LayerCombo, path_row, row
from .layers import META, image_mpp, image_source, plugin_meta, region_placement
from .state import state_for
from .workers import JobRunner

KIND = "mitosis_examples"  # plugin layer kind of the examples Points layer
CLASSES = {"mitotic (1)": 1, "not mitotic (0)": 0}  # the class of the next clicks
COLOURS = {1: "#ff3b3b", 0: "#3bc8ff"}  # face colour of a mitotic / non-mitotic example
POINT_SIZE_PX = 10.0  # display size of an example point (screen-independent image px)


def mitosis_job(image: Any, points: np.ndarray, labels: np.ndarray, mpp: float, out: Path, *, model: str | None,
                steps: int, devices: Sequence[str], source: str) -> Generator[dict, None, Path]:
    """Adapt on the examples, then save (after one more yield, so a Cancel pressed during the last step saves
    nothing); returns the weights path."""
    net, extra = yield from adapt_from_points(image, points, labels, mpp, model=model, steps=steps,
                                              devices=devices, source=source)
    yield {"stage": "saving"}
    return save_mitosis_model(net, out, extra=extra)


def pixel_points(points: Any, image: Any) -> np.ndarray:
    """``(N, 2)`` (row, col) image pixels of a Points layer's points (through both layers' scale and translate)."""
    data = np.asarray(points.data, float).reshape(-1, points.ndim)[:, -2:]
    world = data * np.asarray(points.scale[-2:]) + np.asarray(points.translate[-2:])
    return (world - np.asarray(image.translate[-2:])) / np.asarray(image.scale[-2:])


class MitosisWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.model_path: str | None = None  # the last adapted model (weights file)
        self.image_combo = LayerCombo(napari_viewer, napari.layers.Image)
        self.points_combo = LayerCombo(napari_viewer, napari.layers.Points)
        self.class_combo = QComboBox()
        self.class_combo.addItems(list(CLASSES))
        self.class_combo.currentIndexChanged.connect(lambda *_: self.set_click_class())
        self.points_combo.currentIndexChanged.connect(lambda *_: self.set_click_class())
        self.new_button = QPushButton("New examples layer")
        self.new_button.clicked.connect(lambda: self.create_points())
        self.base_edit = QLineEdit(placeholderText="base classifier (bundled)")
        self.steps = QSpinBox(minimum=1, maximum=100000, value=MitosisConfig.adapt_steps)
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        self.out_edit = QLineEdit(placeholderText="default: <sessions>/mitosis/<image>-<time>")
        self.adapt_button = QPushButton("Adapt")
        self.adapt_button.clicked.connect(lambda: self.start())
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.bar, self.status, self.result = QProgressBar(), QLabel("idle"), QLabel("")
        for label in (self.status, self.result):
            label.setWordWrap(True)
        self.runner = JobRunner(self.bar, self.status, self)
        self.cancel_button.clicked.connect(self.runner.cancel)
        self.runner.started.connect(lambda: self._busy(True))
        self.runner.stopped.connect(lambda *_: self._busy(False))
        form = QFormLayout()
        for label, w in [("image", self.image_combo), ("examples", row(self.points_combo, self.new_button)),
                         ("next clicks", self.class_combo),
                         ("base", path_row(self.base_edit, "Mitosis classifier", "Mitosis model (*.json)")),
                         ("steps / device", row(self.steps, self.device_combo)),
                         ("save as", path_row(self.out_edit, "Save mitosis model", "Mitosis model (*.json)",
                                              save=True))]:
            form.addRow(label, w)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Click mitotic and non-mitotic nuclei (at least one of each), then Adapt. The model "
                             "is saved to 'save as', or by default under the sessions folder, and becomes the "
                             "mitosis model of Adapt & predict.", wordWrap=True))
        lay.addLayout(form)
        for w in (row(self.adapt_button, self.cancel_button), self.bar, self.status, self.result):
            lay.addWidget(w)
        lay.addStretch()

    # ------------------------------------------------------------------------------------------ examples layer

    def _image(self) -> Any:
        layer = self.image_combo.layer()
        if layer is None:
            raise ValueError("no image layer: open an image first")
        return layer

    def create_points(self) -> Any:
        """A new examples Points layer over the chosen image, in add mode (returns it)."""
        image = self.runner.guarded("New examples layer", self._image)
        if image is None:
            return None
        points = self.viewer.add_points(np.zeros((0, 2)), ndim=2, name=f"mitosis examples ({image.name})",
                                        features={"class": np.zeros(0, np.int64)}, size=POINT_SIZE_PX,
                                        metadata={META: {"kind": KIND, "image": image.name}},
                                        **region_placement(image, (0, 0)))
        points.events.data.connect(lambda *_: self._recolour(points))
        points.events.features.connect(lambda *_: self._recolour(points))
        self.points_combo.set_layer(points)
        points.mode = "add"
        self.set_click_class()
        return points

    def click_class(self) -> int:
        return CLASSES[self.class_combo.currentText()]

    def set_click_class(self) -> None:
        """The chosen class becomes the class of new points and, in select mode, of the selected points."""
        points, k = self.points_combo.layer(), self.click_class()
        if points is None or plugin_meta(points).get("kind") != KIND:
            return
        points.feature_defaults = {"class": k}
        points.current_face_color = COLOURS[k]
        sel = sorted(points.selected_data)
        if sel and points.mode == "select":  # in add mode the last click is selected: it keeps its class
            feats = points.features.copy()
            feats.loc[sel, "class"] = k
            points.features = feats
        self._recolour(points)

    def _recolour(self, points: Any) -> None:
        cls = points.features["class"].to_numpy() if "class" in points.features else np.zeros(0)
        if len(cls) == len(points.data) and len(cls):  # mid-edit, napari sends data events before the features
            points.face_color = [COLOURS.get(int(k), "#ffffff") for k in cls]

    def examples(self, points: Any, image: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 2)`` (row, col) image pixels and ``(N,)`` labels of an examples layer; ValueError otherwise."""
        if "class" not in points.features:
            raise ValueError(f"points layer {points.name!r} has no 'class' feature (1 = mitotic, 0 = not): "
                             "use 'New examples layer'")
        labels = points.features["class"].to_numpy()
        if len(labels) != len(points.data) or not np.isin(labels, (0, 1)).all():
            raise ValueError(f"points layer {points.name!r}: 'class' must be 1 (mitotic) or 0 (not) for every point")
        n_pos = int((labels == 1).sum())
        if not n_pos or n_pos == len(labels):
            raise ValueError(f"points layer {points.name!r}: the examples need at least one mitotic (1) and one "
                             f"non-mitotic (0) point; got {n_pos} mitotic and {len(labels) - n_pos} non-mitotic")
        return pixel_points(points, image), labels.astype(np.int64)

    # ------------------------------------------------------------------------------------------ run

    def out_path(self, image: Any) -> Path:
        text = self.out_edit.text().strip()
        if text:
            return Path(text).expanduser()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in image.name)[:80] or "image"
        return self.state.store.root / "mitosis" / f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"

    def start(self) -> Any:
        """Adapt on the chosen examples layer; returns the worker (None, with an error notification, if refused)."""
        return self.runner.guarded("Mitosis adaptation", self._start)

    def _start(self) -> Any:
        image, points = self._image(), self.points_combo.layer()
        if points is None:
            raise ValueError("no examples layer: press 'New examples layer' and click nuclei")
        pts, labels = self.examples(points, image)
        mpp = image_mpp(image)
        if mpp is None:
            show_warning(f"{image.name}: µm per pixel unknown — assuming {DEFAULT_PATCH_MPP:g} µm/px; set it in "
                         "Annotate support")
            mpp = DEFAULT_PATCH_MPP
        lazy = open_array(image_source(image), image.name)  # only patches around the points are read
        self.result.setText("")
        return self.runner.run("Mitosis adaptation", mitosis_job, lazy, pts, labels, mpp, self.out_path(image),
                               model=self.base_edit.text().strip() or None, steps=self.steps.value(),
                               devices=[self.device_combo.currentText()], source=image.name, on_return=self._done)

    def _done(self, path: Path) -> None:
        self.model_path = str(path)
        panels = self.window().findChildren(AdaptSettings) if self.window() is not self else []
        for panel in panels:  # the Adapt & predict panel docked in this viewer's window
            panel.mitosis_edit.setText(self.model_path)
        where = ("set as the mitosis model of Adapt & predict (tick 'mitosis candidates' there)" if panels else
                 "paste it into Adapt & predict's mitosis model field")
        self.result.setText(f"saved: {path} — {where}")
        show_info(f"Mitosis classifier saved: {path}")

    def _busy(self, busy: bool) -> None:
        self.adapt_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
