"""Import of annotation files and restore of autosaved sessions for the Annotate widget (a mixin: it uses the
widget's combos, class list and layer helpers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog

from ..data.task import IGNORE
from ..pipeline import AdaptedHead
from ..sample_data import support_to_layer
from ..slide import labelled_box
from .importing import crop_to_region, merge_support, read_annotations
from .jobs import is_large
from .layers import SUPPORT_REGION_MAX_PX, image_shape, image_source, plugin_meta, support_origin
from .workers import error_text

IMPORT_REGION_MAX_PX = 2 * SUPPORT_REGION_MAX_PX  # largest support region an imported mask may create on a slide


class AnnotationIO:
    """``import_file``, ``add_points`` and ``restore_session`` of :class:`~.annotate.AnnotateWidget`."""

    viewer: Any
    state: Any
    support_combo: Any
    classes_edit: Any

    def _import_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import annotations", "",
                                              "Annotations (*.png *.tif *.tiff *.csv *.xml)")
        if path:
            self.import_file(path)

    def import_file(self, path: str | Path) -> bool:
        """Add a mask, points CSV or Aperio XML to the support; on error nothing changes (returns False)."""
        try:
            got = read_annotations(path, image_shape(self._image()), len(self.classes()))
            if got.support is not None:
                support = self.support_combo.layer()
                if support is None and is_large(image_source(self._image()), self.tiling):
                    box = labelled_box(got.support, IGNORE)  # a slide: a new support region around the imported labels
                    if box is not None and max(box[1] - box[0], box[3] - box[2]) > IMPORT_REGION_MAX_PX:
                        raise ValueError(f"{Path(path).name}: the labels span {box[1] - box[0]} x {box[3] - box[2]} "
                                         f"px, more than a support region of a slide may ({IMPORT_REGION_MAX_PX} "
                                         "px): import a crop of them")
                    support = self.create_support(region=box) if box is not None else None
                elif support is None:
                    support = self.create_support()
                if support is not None:
                    support.data = merge_support(support.data, crop_to_region(got.support, support_origin(support),
                                                                               support.data.shape))
        except ValueError as e:
            show_error(error_text("Import", e))
            return False
        if got.points is not None:
            self.add_points(got.points, got.point_classes)
        show_info(f"Imported {Path(path).name}: {got.summary()}")
        return True

    def add_points(self, pts: np.ndarray, classes: np.ndarray) -> None:
        points = self.create_points()
        feats = {"class": np.r_[points.features["class"].to_numpy(np.int64), np.asarray(classes, np.int64)]}
        with points.events.data.blocker(self.update_circles):
            points.data = np.r_[np.asarray(points.data).reshape(-1, 2), pts]
        points.features = feats

    def restore_session(self) -> bool:
        """Bring back the saved support, points and head of the chosen image (returns success)."""
        try:
            image = self._image()
            data = self.state.store.load(self.state.autosaver.fingerprint(image))
        except ValueError as e:
            show_error(error_text("Restore", e))
            return False
        if data.classes:
            self.classes_edit.setText(", ".join(data.classes))
        if data.support is not None:
            support = self.support_combo.layer()
            if (support is None or plugin_meta(support).get("image") not in (None, image.name)
                    or support.data.shape != data.support.shape or "origin" in plugin_meta(support)):
                support = self.create_support(region=(0, data.support.shape[0], 0, data.support.shape[1]))
            support.data = support_to_layer(data.support)
            self.apply_classes()
        for values, (r0, c0) in data.regions:  # the support regions of a slide come back where they were
            existing = [ly for ly in self.viewer.layers if plugin_meta(ly).get("kind") == "support"
                        and plugin_meta(ly).get("image") == image.name and support_origin(ly) == (r0, c0)
                        and "origin" in plugin_meta(ly) and ly.data.shape == values.shape]
            support = existing[0] if existing else self.create_support(
                region=(r0, r0 + values.shape[0], c0, c0 + values.shape[1]))
            support.data = support_to_layer(values)
            self.apply_classes()
        if data.points is not None and len(data.points):
            self.create_points().data = np.zeros((0, 2))
            self.add_points(data.points, data.point_classes)
        if data.head_path is not None:
            try:
                self.state.set_head(AdaptedHead.load(data.head_path, self.state.backbone()), "session")
            except ValueError as e:
                show_error(error_text("Restoring the head", e))
        show_info(f"Session restored from {data.folder}")
        self._watch()
        return True
