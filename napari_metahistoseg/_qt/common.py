"""Small Qt helpers shared by the widgets: a layer combo box that follows the viewer, file pickers, rows."""

from __future__ import annotations

from typing import Any

import napari
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton, QWidget

from .layers import kind_of


def unwrap(obj: Any) -> Any:
    """The object behind a napari plugin proxy (``PublicOnlyProxy``), or ``obj`` itself."""
    return getattr(obj, "__wrapped__", obj)


class LayerCombo(QComboBox):
    """Layers of ``layer_type`` (and, if given, plugin ``kinds``, preferred first) of a viewer, kept up to date.

    ``optional`` adds a "(none)" entry. The selection follows the layer object, not its position or name.
    """

    def __init__(self, viewer: napari.Viewer, layer_type: type, kinds: tuple[str, ...] | None = None, *,
                 optional: bool = False, exclude_kinds: tuple[str, ...] = (), parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer, self.layer_type, self.kinds = viewer, layer_type, kinds
        self.exclude_kinds, self.optional = exclude_kinds, optional
        self._layers: list[Any] = []
        for ev in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            ev.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._watch_name)
        for ly in viewer.layers:
            ly.events.name.connect(self.refresh)
        self.refresh()

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self.refresh)

    def candidates(self) -> list[Any]:
        out = [ly for ly in self.viewer.layers if isinstance(ly, self.layer_type)
               and kind_of(ly) not in self.exclude_kinds]
        if self.kinds is not None:
            out = [ly for ly in out if kind_of(ly) in self.kinds]
        return out

    def _index(self, layer: Any) -> int:
        """Position of ``layer`` in the list (-1 if absent), by identity of the layer itself: napari hands plugin
        widgets a proxy of the viewer, whose ``add_*`` return proxies of the layers it holds."""
        return next((i for i, ly in enumerate(self._layers) if unwrap(ly) is unwrap(layer)), -1)

    def refresh(self, *_: Any) -> None:
        current = self.layer()
        self._layers = ([None] if self.optional else []) + self.candidates()
        self.blockSignals(True)
        self.clear()
        self.addItems(["(none)" if ly is None else ly.name for ly in self._layers])
        if self._index(current) >= 0:
            self.setCurrentIndex(self._index(current))
        elif self._layers and self.optional:
            self.setCurrentIndex(0)
        self.blockSignals(False)
        if unwrap(self.layer()) is not unwrap(current):
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self) -> Any | None:
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def set_layer(self, layer: Any) -> None:
        if self._index(layer) < 0:
            self.refresh()
        if self._index(layer) >= 0:
            self.setCurrentIndex(self._index(layer))


def row(*widgets: QWidget | str) -> QWidget:
    """Widgets side by side (strings become labels)."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(QLabel(x) if isinstance(x, str) else x)
    return w


def path_row(edit: QLineEdit, caption: str, filter_: str, *, save: bool = False) -> QWidget:
    """A line edit with a "…" button opening a file dialog."""
    button = QPushButton("…")
    button.setMaximumWidth(30)

    def pick() -> None:
        dialog = QFileDialog.getSaveFileName if save else QFileDialog.getOpenFileName
        path, _ = dialog(edit, caption, edit.text(), filter_)
        if path:
            edit.setText(path)
            edit.editingFinished.emit()

    button.clicked.connect(pick)
    return row(edit, button)
