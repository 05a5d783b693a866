"""Autosave of the support annotations and the adapted head (core: :mod:`napari_metahistoseg.session`).

The :class:`Autosaver` of a viewer follows every plugin support layer (kind ``"support"``) and centroid points layer
(kind ``"points"``) in it, whichever widget made them (the Annotate widget, the demo sample, an import). Each edit
marks the layer dirty and (re)starts a short timer; when it fires every dirty layer is written into the session of
its image (the image layer named by its ``"image"`` metadata): support regions of a slide one file each, the points
of all the image's points layers together. Removing a layer (or its image, or closing the viewer) writes its
pending edits first. The Adapt widget saves each adapted head. Failures become warnings, never lost work in the GUI.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, QTimer, Signal

from ..session import SessionStore, image_fingerprint
from .common import unwrap
from .layers import image_mpp, image_source, kind_of, layer_to_support, plugin_meta, support_origin

log = logging.getLogger(__name__)

AUTOSAVE_DELAY_MS = 2000  # write this long after the last edit
EDIT_EVENTS = {"support": ("paint", "data"), "points": ("data", "features")}  # layer events that change annotations


class Autosaver(QObject):
    """Debounced writer of the sessions of a viewer's images. ``saved`` fires with the part written."""

    saved = Signal(str)

    def __init__(self, store_getter: Any, parent: QObject | None = None, delay_ms: int = AUTOSAVE_DELAY_MS) -> None:
        super().__init__(parent)
        self._store = store_getter  # callable: the state's current SessionStore (its root is configurable)
        self.image: Any = None  # what the Annotate widget works on (watch): saved by save_now even if unedited
        self.support: Any = None
        self.points: Any = None
        self._viewer: Any = None  # weakref to the viewer followed (attach)
        self._tracked: dict[int, tuple[Any, str]] = {}  # id(layer) → (layer, kind) followed
        self._dirty: dict[int, tuple[Any, str]] = {}  # edited, not saved yet (kept alive here until saved)
        self._warned: set[int] = set()  # layers already warned about (image not found)
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

    # ------------------------------------------------------------------------------------------ following layers

    def attach(self, viewer: Any) -> None:
        """Follow every plugin support and points layer of ``viewer``: those in it now and those added later."""
        viewer = unwrap(viewer)
        if self._viewer is not None and self._viewer() is viewer:
            return
        self._viewer = weakref.ref(viewer)
        viewer.layers.events.inserted.connect(self._inserted)
        viewer.layers.events.removed.connect(self._removed)
        for layer in viewer.layers:
            self.track(layer)

    def track(self, layer: Any, kind: str | None = None) -> None:
        """Follow the edits of ``layer`` (a support or points layer; ``kind`` defaults to its plugin metadata)."""
        layer = unwrap(layer)
        kind = kind or kind_of(layer)
        if layer is None or kind not in EDIT_EVENTS or id(layer) in self._tracked:
            return
        self._tracked[id(layer)] = (layer, kind)
        for name in EDIT_EVENTS[kind]:
            getattr(layer.events, name).connect(self._edited)

    def _untrack(self, layer: Any) -> None:
        _, kind = self._tracked.pop(id(layer), (None, None))
        for name in EDIT_EVENTS.get(kind, ()):
            getattr(layer.events, name).disconnect(self._edited)

    def watch(self, image: Any, support: Any, points: Any = None) -> None:
        """The Annotate widget works on ``support`` (and ``points``) of ``image``: make sure they are followed (also
        without plugin metadata; ``image`` is theirs when their metadata names no open image) and save pending edits."""
        self.image, self.support, self.points = unwrap(image), unwrap(support), unwrap(points)
        self.track(self.support, "support")
        self.track(self.points, "points")
        if self._dirty or self.timer.isActive():
            self.save_now()

    def _inserted(self, event: Any) -> None:
        layer = unwrap(event.value)
        self.track(layer)
        if isinstance(layer, napari.layers.Image) and self._dirty:
            self.timer.start()  # edits kept for want of their image may now find it

    def _removed(self, event: Any) -> None:
        """Write the pending edits of a removed layer (still alive here), or of the layers of a removed image."""
        layer = unwrap(event.value)
        if isinstance(layer, napari.layers.Image):
            pending = [e for e in self._dirty.values() if self._image_of(e[0], extra=layer) is layer]
            if pending:
                self._flush(pending, extra=layer)
            return
        if id(layer) in self._dirty:
            self._flush([self._dirty[id(layer)]])
        self._untrack(layer)
        if layer is self.support:
            self.support = None
        if layer is self.points:
            self.points = None

    def _edited(self, event: Any = None) -> None:
        layer = unwrap(getattr(event, "source", None))
        if id(layer) in self._tracked:
            self._dirty[id(layer)] = self._tracked[id(layer)]
            self.timer.start()

    # ------------------------------------------------------------------------------------------ saving

    def save_now(self) -> bool:
        """Write every edited support and points layer now, and the watched ones even if unedited; False if there was
        nothing to write or a part could not be written (with a warning; it stays pending)."""
        self.timer.stop()
        for layer, kind in ((self.support, "support"), (self.points, "points")):
            if layer is not None and id(layer) not in self._dirty:
                self._dirty[id(layer)] = (layer, kind)
        if not self._dirty:
            return False
        return self._flush(list(self._dirty.values()))

    def _image_of(self, layer: Any, extra: Any = None) -> Any:
        """The image layer ``layer`` annotates: the open image its metadata names (or ``extra``, being removed), else
        the watched image for the watched layers; None if not found."""
        name = plugin_meta(layer).get("image")
        viewer = self._viewer() if self._viewer is not None else None
        images = [ly for ly in (viewer.layers if viewer is not None else []) if isinstance(ly, napari.layers.Image)]
        for image in [*images, *([extra] if extra is not None else [])]:
            if name is not None and image.name == name:
                return image
        return self.image if layer is self.support or layer is self.points else None

    def _flush(self, entries: list[tuple[Any, str]], extra: Any = None) -> bool:
        """Save the ``(layer, kind)`` entries (dirty ones) grouped by image; those whose image is not found stay
        dirty (warned once). ``saved`` fires if anything was written; False if something was not."""
        by_image: dict[int, tuple[Any, list]] = {}
        ok, saved = True, False
        for layer, kind in entries:
            image = self._image_of(layer, extra)
            if image is None:
                ok = False
                self._warn_no_image(layer)
                continue
            by_image.setdefault(id(image), (image, []))[1].append((layer, kind))
        for image, group in by_image.values():
            if not self._save(image, group, extra):
                ok = False
                continue
            saved = True
            for layer, _ in group:
                self._dirty.pop(id(layer), None)
                self._warned.discard(id(layer))
        if not self._dirty:
            self.timer.stop()
        if saved:
            self.saved.emit("support")
        return ok

    def _warn_no_image(self, layer: Any) -> None:
        if id(layer) in self._warned:
            return
        self._warned.add(id(layer))
        name = plugin_meta(layer).get("image")
        whose = (f"belongs to image {name!r}, which is not open (renamed or closed?)" if name
                 else "names no image (choose it in the Annotate widget)")
        log.warning("autosave: layer %r %s", layer.name, whose)
        show_warning(f"Autosave: layer {layer.name!r} {whose}: its edits are kept, not saved yet")

    def _save(self, image: Any, entries: list[tuple[Any, str]], extra: Any = None) -> bool:
        """Write the supports among the ``(layer, kind)`` entries and the points of every points layer of ``image``
        (all its groups': one points file per image)."""
        try:
            fp = self.fingerprint(image)
            for layer, kind in entries:
                if kind == "support":
                    meta = plugin_meta(layer)
                    self.store.save_support(fp, layer_to_support(layer.data), classes=meta.get("classes"),
                                            colours=meta.get("colours"), image_name=image.name,
                                            mpp=image_mpp(image),
                                            origin=support_origin(layer) if "origin" in meta else None)
            points = {id(ly): ly for ly, kind in [*self._tracked.values(), *self._dirty.values()]
                      if kind == "points" and self._image_of(ly, extra) is image}
            if points:
                self.store.save_points(fp, *_points_and_classes(list(points.values())))
        except (OSError, ValueError) as e:
            log.warning("autosave of %r failed: %s", image.name, e)
            show_warning(f"Autosave of {image.name!r} failed ({self.store.root}): {e}")
            return False
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


def _points_and_classes(layers: list) -> tuple[np.ndarray, np.ndarray]:
    """The points ``(N, 2)`` (image coordinates) and class ids ``(N,)`` of several points layers of one image."""
    pts, cls = [], []
    for layer in layers:
        data = np.asarray(layer.data, np.float64).reshape(-1, 2)
        if len(data) and "class" not in layer.features:
            raise ValueError(f"points layer {layer.name!r} has no 'class' feature")
        pts.append(data)
        cls.append(layer.features["class"].to_numpy(np.int64) if "class" in layer.features else np.zeros(0, np.int64))
    return np.concatenate(pts), np.concatenate(cls)
