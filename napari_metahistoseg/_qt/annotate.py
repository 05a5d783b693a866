"""Annotate support: a Labels layer to paint (0 = unknown, never background), centroid clicks turned into circles
live, the task's classes named and coloured, annotation import, autosave and session restore.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from ..config import TilingConfig
from ..data.points import points_to_masks, radius_in_pixels
from ..sample_data import DEFAULT_CLASSES, META, class_colours, labels_colormap, support_to_layer
from ..session import SessionStore
from .annotate_io import AnnotationIO
from .common import LayerCombo, path_row, row
from .jobs import is_large
from .layers import (
    find_layers,
    image_mpp,
    image_source,
    new_group,
    plugin_meta,
    region_placement,
    set_classes,
    support_origin,
    support_region,
)
from .state import state_for
from .workers import error_text

POINT_SIZE_PX = 8.0


class AnnotateWidget(AnnotationIO, QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.tiling = TilingConfig()  # stream_above_mp: images above it get support regions, not slide-sized layers
        self._points_outside = 0  # centroids outside the support region (reported when the count grows)
        self.image_combo = LayerCombo(napari_viewer, napari.layers.Image)
        self.support_combo = LayerCombo(napari_viewer, napari.layers.Labels, kinds=("support",))
        self.classes_edit = QLineEdit(", ".join(DEFAULT_CLASSES))
        self.classes_edit.editingFinished.connect(self.apply_classes)
        self.class_combo = QComboBox()
        self.class_combo.currentIndexChanged.connect(self.set_current_class)
        self.radius = QDoubleSpinBox(minimum=0.5, maximum=500.0, value=12.0, decimals=1)
        self.unit = QComboBox()
        self.unit.addItems(["px", "um"])
        self.mpp = QDoubleSpinBox(minimum=0.0, maximum=100.0, value=0.0, decimals=3, specialValueText="unknown")
        for w in (self.radius, self.mpp):
            w.valueChanged.connect(self._settings_changed)
        self.unit.currentIndexChanged.connect(self._settings_changed)
        self.session_edit = QLineEdit(str(self.state.store.root))
        self.session_edit.editingFinished.connect(self._set_session_root)
        self.restore_button = QPushButton("Restore session", enabled=False)
        self.restore_button.clicked.connect(self.restore_session)
        self.session_label = QLabel()
        buttons = {"New support layer": self.create_support, "Add centroid points": self.create_points,
                   "Import annotations…": self._import_dialog}
        form = QFormLayout()
        for label, w in [("image", self.image_combo), ("support", self.support_combo),
                         ("classes", self.classes_edit), ("paint / click", self.class_combo),
                         ("circle radius", row(self.radius, self.unit)), ("image µm/px", self.mpp),
                         ("sessions", path_row(self.session_edit, "Session folder", "", save=True))]:
            form.addRow(label, w)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        for text, fn in buttons.items():
            b = QPushButton(text)
            b.clicked.connect(lambda *_, f=fn: f())
            lay.addWidget(b)
        lay.addWidget(row(self.restore_button, self.session_label))
        lay.addStretch()
        self.image_combo.currentIndexChanged.connect(self._image_changed)
        self.support_combo.currentIndexChanged.connect(self._support_changed)
        self._image_changed()
        self._support_changed()

    # ------------------------------------------------------------------------------------------ state

    def classes(self) -> list[str]:
        names = [c.strip() for c in self.classes_edit.text().split(",") if c.strip()]
        return names if len(names) >= 2 else list(DEFAULT_CLASSES)

    def points_layer(self) -> Any:
        group = plugin_meta(self.support_combo.layer()).get("group")
        found = find_layers(self.viewer, "points", group) if group else []
        return found[0] if found else None

    def circles_layer(self) -> Any:
        group = plugin_meta(self.support_combo.layer()).get("group")
        found = find_layers(self.viewer, "circles", group) if group else []
        return found[0] if found else None

    def _image(self) -> Any:
        layer = self.image_combo.layer()
        if layer is None:
            raise ValueError("open an image first")
        return layer

    def _image_changed(self, *_: Any) -> None:
        layer = self.image_combo.layer()
        self.mpp.setValue(image_mpp(layer) or 0.0)
        self.restore_button.setEnabled(False)
        self.session_label.setText("")
        if layer is None:
            return
        fp = self.state.autosaver.fingerprint(layer)
        if self.state.store.has(fp):
            self.restore_button.setEnabled(True)
            self.session_label.setText("saved session found")
            show_info(f"A saved session exists for {layer.name!r}: press 'Restore session' (Annotate widget)")
        self._watch()

    def _support_changed(self, *_: Any) -> None:
        meta = plugin_meta(self.support_combo.layer())
        if meta.get("classes"):
            self.classes_edit.setText(", ".join(meta["classes"]))
        self._fill_class_combo()
        self._watch()

    def _watch(self) -> None:
        image, support = self.image_combo.layer(), self.support_combo.layer()
        if image is not None and support is not None:
            self.state.autosaver.watch(image, support, self.points_layer())

    def _set_session_root(self) -> None:
        self.state.store = SessionStore(self.session_edit.text().strip() or None)
        self._image_changed()

    def _fill_class_combo(self) -> None:
        keep = self.class_combo.currentIndex()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(self.classes())
        self.class_combo.setCurrentIndex(min(max(keep, 0), len(self.classes()) - 1))
        self.class_combo.blockSignals(False)
        self.set_current_class(self.class_combo.currentIndex())

    def apply_classes(self) -> None:
        """Name/colour the task's classes on the support, circles and points layers."""
        classes, colours = self.classes(), class_colours(len(self.classes()))
        for layer in (self.support_combo.layer(), self.circles_layer()):
            if layer is not None:
                set_classes(layer, classes, colours, offset=1)
        self._fill_class_combo()
        self.update_circles()

    def set_current_class(self, k: int) -> None:
        """Class ``k`` becomes the brush label (k + 1), the class of new points and, in select mode, of the selected
        points (in add mode napari selects each new point: switching class for the next click must not re-class the
        last one)."""
        k = max(int(k), 0)
        colours = class_colours(len(self.classes()))
        support, points = self.support_combo.layer(), self.points_layer()
        if support is not None:
            support.selected_label = k + 1
        if points is not None and k < len(colours):
            points.feature_defaults = {"class": k}
            points.current_face_color = colours[k]
            sel = sorted(points.selected_data) if str(points.mode) == "select" else []
            if sel:
                feats = points.features.copy()
                feats.loc[sel, "class"] = k
                points.features = feats
                self.update_circles()

    # ------------------------------------------------------------------------------------------ layers

    def create_support(self, region: tuple[int, int, int, int] | None = None) -> Any:
        """A new support Labels layer for the chosen image, in paint mode (returns it). It covers the image, or on
        an image above ``self.tiling.stream_above_mp`` the visible field (:func:`.layers.support_region`; pan
        elsewhere and press the button again for another region) — or the given ``(r0, r1, c0, c1)``."""
        image = self._image()
        large = is_large(image_source(image), self.tiling)
        r0, r1, c0, c1 = region if region is not None else support_region(image, large)
        classes, colours = self.classes(), class_colours(len(self.classes()))
        meta = {META: {"kind": "support", "classes": classes, "colours": colours, "group": new_group(),
                       "image": image.name, **({"origin": [r0, c0]} if (r0, c0) != (0, 0) or large else {})}}
        name = f"support ({image.name})" if not large else f"support ({image.name} @ {r0},{c0})"
        layer = self.viewer.add_labels(np.zeros((r1 - r0, c1 - c0), np.uint8), name=name,
                                       metadata=meta, opacity=0.7, colormap=labels_colormap(colours, offset=1),
                                       **region_placement(image, (r0, c0)))
        self.support_combo.set_layer(layer)
        layer.mode = "paint"
        self.set_current_class(self.class_combo.currentIndex())
        return layer

    def create_points(self) -> Any:
        """Centroid-click Points layer and its live circles layer (same group as the support)."""
        support = self.support_combo.layer() or self.create_support()
        if self.points_layer() is not None:
            return self.points_layer()
        image, meta = self._image(), plugin_meta(support)
        colours = meta.get("colours") or class_colours(len(self.classes()))
        cmeta = {META: {**meta, "kind": "circles"}}  # the support's region (origin) too
        self.viewer.add_labels(np.zeros(support.data.shape, np.uint8), name=f"circles ({image.name})",
                               metadata=cmeta, opacity=0.4, colormap=labels_colormap(colours, offset=1),
                               **region_placement(image, support_origin(support)))
        points = self.viewer.add_points(np.zeros((0, 2)), ndim=2, name=f"centroids ({image.name})",
                                        features={"class": np.zeros(0, np.int64)}, size=POINT_SIZE_PX,
                                        metadata={META: {**{k: v for k, v in meta.items() if k != "origin"},
                                                         "kind": "points"}},  # image coordinates
                                        **region_placement(image, (0, 0)))
        points.events.data.connect(self.update_circles)
        points.events.features.connect(self.update_circles)
        points.mode = "add"
        self.set_current_class(self.class_combo.currentIndex())
        self._watch()
        return points

    def radius_px(self) -> float:
        return radius_in_pixels(self.radius.value(), self.unit.currentText(), self.mpp.value() or None)

    def _settings_changed(self, *_: Any) -> None:
        image = self.image_combo.layer()
        if image is not None and self.mpp.value() > 0:
            image.metadata = {**image.metadata, "mpp": self.mpp.value()}
        self.update_circles()

    def update_circles(self, *_: Any) -> None:
        """Redraw the circles layer from the points (live, on every point edit)."""
        points, circles = self.points_layer(), self.circles_layer()
        if points is None or circles is None:
            return
        h, w = circles.data.shape
        pts = np.asarray(points.data, float).reshape(-1, 2) - np.asarray(support_origin(circles), float)
        cls = points.features["class"].to_numpy(np.int64) if "class" in points.features else np.ones(len(pts), int)
        if len(cls) != len(pts):  # mid-edit (napari sends data events before the features follow)
            return
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
        outside = int((~inside).sum())
        if outside > self._points_outside:  # kept in the points layer (and autosaved), but not in this support
            show_info(f"{outside} centroid(s) lie outside the support region of {circles.name!r} and are not used "
                      "for adaptation: make a support layer where they are")
        self._points_outside = outside
        try:
            sem, _ = points_to_masks(pts[inside], cls[inside], (h, w), self.radius_px())
        except ValueError as e:
            show_error(error_text("Circles", e))
            return
        circles.data = support_to_layer(sem)
        # the radius goes with the circles: Adapt records it, and Predict then detects the cells at that size
        circles.metadata = {**circles.metadata, META: {**plugin_meta(circles), "radius_px": float(self.radius_px())}}
        colours = class_colours(len(self.classes()))
        if len(cls):
            points.face_color = [colours[k % len(colours)] for k in cls]
