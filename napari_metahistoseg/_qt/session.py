"""Autosave of the support annotations and the adapted head (core: :mod:`napari_metahistoseg.session`).

The Annotate widget tells the :class:`Autosaver` which image, support layer and points layer are being worked
on; every stroke or point edit (re)starts a short timer and the annotations are written when it fires
(debounced). The Adapt widget saves each adapted head. Failures become warnings, never lost work in the GUI.
"""

from __future__ import annotations

import logging
from typing import Any

from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from ..session import SessionStore, image_fingerprint
from .layers import image_mpp, image_source, layer_to_support, plugin_meta, support_origin

log = logging.getLogger(__name__)

AUTOSAVE_DELAY_MS = 2000  # write this long after the last edit


class Autosaver(QObject):
    """Debounced writer of one image's session. ``saved`` fires with the part written."""

    saved = Signal(str)

    def __init__(self, store_getter: Any, parent: QObject | None = None, delay_ms: int = AUTOSAVE_DELAY_MS) -> None:
        super().__init__(parent)
        self._store = store_getter  # callable: the state's current SessionStore (its root is configurable)
        self.image: Any = None
        self.support: Any = None
        self.points: Any = None
        self._fps: dict[int, tuple[int, str]] = {}
        self.timer = QTimer(self, singleShot=True, interval=delay_ms)
        self.timer.timeout.connect(self.save_now)

    @property
    def store(self) -> SessionStore:
        return self._store()

    def fingerprint(self, image_layer: Any) -> str:
        """Fingerprint of an image layer's pixels (cached while its data object stays the same)."""
        key, data_id = id(image_layer), id(image_layer.data)
        if key not in self._fps or self._fps[key][0] != data_id:
            self._fps[key] = (data_id, image_fingerprint(image_source(image_layer)))
        return self._fps[key][1]

    def watch(self, image: Any, support: Any, points: Any = None) -> None:
        """Follow edits of ``support`` (and ``points``) of ``image``; pending edits of the previous set are saved."""
        if self.timer.isActive():
            self.save_now()
        for layer, events in ((self.support, ("paint", "data")), (self.points, ("data", "features"))):
            for name in events if layer is not None else ():
                getattr(layer.events, name).disconnect(self.schedule)
        self.image, self.support, self.points = image, support, points
        for layer, events in ((support, ("paint", "data")), (points, ("data", "features"))):
            for name in events if layer is not None else ():
                getattr(layer.events, name).connect(self.schedule)

    def schedule(self, *_: Any) -> None:
        self.timer.start()

    def save_now(self) -> bool:
        """Write the watched support and points now; False (with a warning) if that failed."""
        self.timer.stop()
        if self.image is None or self.support is None:
            return False
        try:
            fp = self.fingerprint(self.image)
            meta = plugin_meta(self.support)
            self.store.save_support(fp, layer_to_support(self.support.data), classes=meta.get("classes"),
                                    colours=meta.get("colours"), image_name=self.image.name,
                                    mpp=image_mpp(self.image),
                                    origin=support_origin(self.support) if "origin" in meta else None)
            if self.points is not None:
                cls = self.points.features.get("class")
                self.store.save_points(fp, self.points.data, [] if cls is None else cls.to_numpy())
        except (OSError, ValueError) as e:
            log.warning("autosave failed: %s", e)
            show_warning(f"Autosave failed ({self.store.root}): {e}")
            return False
        self.saved.emit("support")
        return True

    def save_head(self, head: Any, image_layer: Any) -> bool:
        """Save an adapted head into the session of ``image_layer``."""
        try:
            self.store.save_head(self.fingerprint(image_layer), head)
        except (OSError, ValueError) as e:
            log.warning("autosave of the head failed: %s", e)
            show_warning(f"Autosave of the head failed ({self.store.root}): {e}")
            return False
        self.saved.emit("head")
        return True
