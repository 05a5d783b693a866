"""Export / import head: save the adapted head with its provenance, load one back (refused for another
backbone), and show where the current head came from."""

from __future__ import annotations

from pathlib import Path

import napari
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFormLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget

from ..pipeline import AdaptedHead
from .common import path_row, row
from .io import head_summary, load_head_into
from .state import state_for
from .workers import error_text

HEAD_FILTER = "MetaHistoSeg head (*.mhshead.json)"


class HeadsWidget(QWidget):
    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.backbone_edit = QLineEdit(self.state.backbone_spec)
        self.backbone_edit.setPlaceholderText("backbone checkpoint (bundled: default)")
        self.backbone_edit.editingFinished.connect(
            lambda: setattr(self.state, "backbone_spec", self.backbone_edit.text()))
        self.state.backbone_changed.connect(self.backbone_edit.setText, check_nargs=False)
        self.export_edit = QLineEdit(placeholderText="where to save (…/name.mhshead.json)")
        self.import_edit = QLineEdit(placeholderText="head to load (*.mhshead.json)")
        export_button, import_button = QPushButton("Export head"), QPushButton("Import head")
        export_button.clicked.connect(lambda: self.export_head(self.export_edit.text()))
        import_button.clicked.connect(lambda: self.import_head(self.import_edit.text()))
        self.info = QLabel()
        self.info.setWordWrap(True)
        form = QFormLayout()
        form.addRow("backbone", path_row(self.backbone_edit, "Backbone", "Backbone (*.safetensors *.json)"))
        form.addRow("export to", row(path_row(self.export_edit, "Export head", HEAD_FILTER, save=True),
                                     export_button))
        form.addRow("import", row(path_row(self.import_edit, "Import head", HEAD_FILTER), import_button))
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.info)
        lay.addStretch()
        self.state.head_changed.connect(self.refresh)
        self.refresh()

    def refresh(self, *_: object) -> None:
        head = self.state.head
        self.info.setText("No head yet: adapt one or import a file." if head is None else
                          f"Current head ({self.state.head_source}):\n{head_summary(head)}")

    def export_head(self, path: str | Path) -> Path | None:
        """Save the current head (safetensors + provenance JSON); returns the JSON path."""
        head = self.state.head
        if head is None:
            show_error("Export failed: no adapted head yet (press Adapt first)")
            return None
        if not str(path).strip():
            show_error("Export failed: choose a file name")
            return None
        try:
            _, jpath = head.save(path)
        except (OSError, ValueError) as e:
            show_error(error_text("Export", e))
            return None
        show_info(f"Head saved to {jpath}")
        return Path(jpath)

    def import_head(self, path: str | Path) -> AdaptedHead | None:
        """Load a head made for the chosen backbone (refused with a notification otherwise)."""
        if not str(path).strip():
            show_error("Import failed: choose a head file")
            return None
        self.state.backbone_spec = self.backbone_edit.text()
        return load_head_into(self.viewer, path)
